"""One optimizer step of KD training on a DeepSpeed engine, with no Ray in sight.

The Ray Train worker (`raykd.kd.worker`) and the benchmarks (`benchmarks/truncation.py`,
`benchmarks/teacher_signal.py`) run the same `train_step`.

Compute follows the kept tokens: the student's decoder runs on right-padded micro-batches of truncated
sequences (no attention mask: causal attention never lets a real token see a later pad), its final hidden
states are gathered at the supervised positions only, and `raykd.kd.losses.chunked_kd_loss` projects them on
the lm_head and takes CE + KD one chunk of positions at a time. Nothing of shape (batch, length, vocab)
exists, for the student or the teacher.

Loss normalisation: every supervised token of an optimizer step weighs the same, whatever micro-batch or
worker it lands in. Each micro-batch's loss is its *sum* over tokens divided by the step's total supervised
tokens N (all micro-batches of all workers, one all-reduce before the first forward). A per-micro-batch mean
would give the tokens of short (truncated) micro-batches more weight than those of long ones, and would change
with the micro-batch size and the number of workers. DeepSpeed averages gradients over the W data-parallel
workers and, by default, divides the loss by the accumulation steps; we pass `scale_wrt_gas=False` and
multiply by W, so the gradient is exactly d(sum over the step's tokens)/N.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from raykd.kd.batching import MicroBatch
from raykd.kd.losses import KDLossConfig, TeacherHead, TopKTeacher, chunked_kd_loss

# Names of the sums a step accumulates; the worker all-reduces them as one vector.
SUM_KEYS = (
    "loss_sum",
    "ce_sum",
    "kd_sum",
    "topk_mass_sum",
    "tokens",
    "kd_tokens",
    "ce_prompt",
    "ce_cot",
    "ce_answer",
    "kd_prompt",
    "kd_cot",
    "kd_answer",
    "tokens_prompt",
    "tokens_cot",
    "tokens_answer",
    "forward_tokens",
    "kept_tokens",
    "padded_tokens",
    "sequences",
    "dummy_micro_batches",
    "flops",
)


# ------------------------------------------------------------------------------------------ the model


def decoder(model: nn.Module) -> nn.Module:
    """The transformer body of a Hugging Face causal LM (LlamaModel inside LlamaForCausalLM, ...)."""
    body = getattr(model, model.base_model_prefix, None)
    if body is None or body is model:
        raise ValueError(f"{type(model).__name__} has no separate base model to take hidden states from")
    return body


def lm_head_weight(model: nn.Module) -> nn.Parameter:
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("the lm_head has a bias; the chunked loss supports logits = hidden @ weight.T only")
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(model.config, name, None) not in (None, 1.0):
            raise ValueError(f"config.{name} rescales logits; the chunked loss supports plain lm_heads only")
    return head.weight


def supervised_hidden(body: nn.Module, input_ids: Tensor, flat_pos: Tensor) -> Tensor:
    """Final hidden states at the supervised positions. input_ids: (B, L), flat_pos: (N,) -> (N, d)."""
    hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, L, d), after the final norm
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_pos)


class KDStudent(nn.Module):
    """The student as DeepSpeed sees it: forward(batch) -> the loss sums of `chunked_kd_loss`.

    Returns a tuple of tensors (DeepSpeed attaches its ZeRO-3 backward hooks to tensors in tuples):
    (loss_sum, ce_sum, kd_sum, topk_mass_sum, kd_tokens, segment_ce (3,), segment_kd (3,), segment_tokens
    (3,)).
    """

    def __init__(self, model: nn.Module, loss: KDLossConfig):
        super().__init__()
        self.model = model
        self.loss = loss
        lm_head_weight(model)  # fail early on heads the chunked loss cannot take

    def register_zero3(self) -> None:
        """Under ZeRO-3 the lm_head weight is read here, outside the lm_head's own forward: tell DeepSpeed."""
        import deepspeed

        deepspeed.zero.register_external_parameter(self, lm_head_weight(self.model))

    def forward(
        self,
        input_ids: Tensor,
        flat_pos: Tensor,
        target_ids: Tensor,
        segment: Tensor,
        topk_ids: Tensor,
        topk_logprobs: Tensor,
        has_teacher: Tensor,
        teacher_hidden: Tensor | None = None,
        teacher_weight: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        hidden = supervised_hidden(decoder(self.model), input_ids, flat_pos)
        weight = lm_head_weight(self.model)
        if teacher_hidden is not None:
            weight, teacher_weight = shared_vocabulary(weight, teacher_weight)
            sums = chunked_kd_loss(
                hidden, weight, target_ids, TeacherHead(teacher_hidden, teacher_weight), self.loss, segment
            )
            return _as_tuple(sums, sums.n_tokens)
        if bool(has_teacher.all()):
            sums = chunked_kd_loss(
                hidden, weight, target_ids, TopKTeacher(topk_ids, topk_logprobs), self.loss, segment
            )
            return _as_tuple(sums, sums.n_tokens)
        return self._split_forward(hidden, weight, target_ids, segment, topk_ids, topk_logprobs, has_teacher)

    def _split_forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        target_ids: Tensor,
        segment: Tensor,
        topk_ids: Tensor,
        topk_logprobs: Tensor,
        has_teacher: Tensor,
    ) -> tuple[Tensor, ...]:
        """Prompt targets without cached teacher rows: their loss is (1 - λ)·CE, the KD term is absent."""
        t, s = has_teacher.nonzero().squeeze(-1), (~has_teacher).nonzero().squeeze(-1)
        kd = chunked_kd_loss(
            hidden[t],
            weight,
            target_ids[t],
            TopKTeacher(topk_ids[t], topk_logprobs[t]),
            self.loss,
            segment[t],
        )
        # lam = 0 makes loss_sum plain CE; the teacher passed is a placeholder the CE never reads.
        ce_only = dataclasses.replace(self.loss, lam=0.0)
        placeholder = TopKTeacher(target_ids[s, None], torch.zeros_like(topk_logprobs[s, :1]))
        ce = chunked_kd_loss(hidden[s], weight, target_ids[s], placeholder, ce_only, segment[s])
        return (
            kd.loss_sum + (1.0 - self.loss.lam) * ce.loss_sum,
            kd.ce_sum + ce.ce_sum,
            kd.kd_sum,
            kd.topk_mass_sum,
            torch.tensor(float(kd.n_tokens)),
            kd.segment_ce_sum + ce.segment_ce_sum,
            kd.segment_kd_sum,
            kd.segment_tokens + ce.segment_tokens,
        )


def _as_tuple(sums: Any, kd_tokens: int) -> tuple[Tensor, ...]:
    return (
        sums.loss_sum,
        sums.ce_sum,
        sums.kd_sum,
        sums.topk_mass_sum,
        torch.tensor(float(kd_tokens)),
        sums.segment_ce_sum,
        sums.segment_kd_sum,
        sums.segment_tokens,
    )


class OnlineTeacher:
    """A frozen teacher run per micro-batch for exact full-vocabulary KD; not part of the DeepSpeed engine."""

    def __init__(self, model: nn.Module):
        self.model = model.eval().requires_grad_(False)
        self.body = decoder(model)
        self.weight = lm_head_weight(model)

    @torch.no_grad()
    def hidden(self, input_ids: Tensor, flat_pos: Tensor) -> Tensor:
        """(N, d_teacher) final hidden states at the supervised positions; logits are made per chunk later."""
        return supervised_hidden(self.body, input_ids, flat_pos)


def shared_vocabulary(student_weight: Tensor, teacher_weight: Tensor) -> tuple[Tensor, Tensor]:
    """Both lm_heads cut to the rows they share. student_weight: (V_s, d), teacher_weight: (V_t, d_t).

    One tokenizer, two embedding sizes (padding rows past the tokenizer, e.g. 152064 vs 151936): row i is
    the same token in both only below min(V_s, V_t) (raykd.traces.checks.check_vocabulary saw to that), so
    the online KD compares the two distributions over those rows. Slicing is a view: gradients reach the
    student's own rows.
    """
    rows = min(student_weight.shape[0], teacher_weight.shape[0])
    return student_weight[:rows], teacher_weight[:rows]


def check_vocab(student: nn.Module, max_topk_id: int | None = None) -> None:
    """A clear error, before any step, when the cached teacher ids cannot index the student's vocabulary
    (the traces' own ids; the tokenizers themselves were compared on the driver)."""
    vocab = _rows(student.get_output_embeddings().weight)
    if max_topk_id is not None and max_topk_id >= vocab:
        raise ValueError(
            f"cached teacher top-k holds token id {max_topk_id}, outside the student's vocabulary ({vocab}); "
            "the traces come from a teacher with another vocabulary"
        )


# ------------------------------------------------------------------------------------------ DeepSpeed


def ds_config(
    *,
    batch_size: int,
    micro_batch_size: int,
    world_size: int,
    zero_stage: int,
    lr: float,
    weight_decay: float,
    bf16: bool,
    grad_clip: float = 1.0,
    token_budget: bool = False,
) -> dict[str, Any]:
    """DeepSpeed config: global batch = micro x accumulation x workers, AdamW, ZeRO stage, bf16 on GPU.

    `train_step` marks each step's last micro-batch as the accumulation boundary itself, so the batch
    figures here are DeepSpeed's bookkeeping only. With a token budget (`token_budget`) micro-batches hold
    varying numbers of sequences: the config then counts one sequence per micro-batch.
    """
    micro = 1 if token_budget else micro_batch_size
    per_pass = micro * world_size
    if batch_size % per_pass:
        raise ValueError(
            f"training.batch_size {batch_size} is not a multiple of micro_batch_size x workers = {per_pass}; "
            f"use a multiple of {per_pass}"
        )
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:  # the final Hugging Face save needs the whole weights on rank 0
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": batch_size // per_pass,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "gradient_clipping": grad_clip,
        # torch's AdamW: DeepSpeed's fused/CPU Adam would JIT-build a C++/CUDA op on first use.
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "weight_decay": weight_decay, "torch_adam": True},
        },
        "steps_per_print": 10**9,  # our own log line replaces DeepSpeed's
        "wall_clock_breakdown": False,
    }


def load_student(
    folder: str, dtype: torch.dtype, config: dict[str, Any], trust_remote_code: bool = False
) -> nn.Module:
    """The student from a Hugging Face folder, in `dtype` from the start (bf16 on GPU: no fp32 copy first).

    Under ZeRO-3 the weights are partitioned while they load (transformers runs `deepspeed.zero.Init` when a
    `HfDeepSpeedConfig` of stage 3 is alive): no rank ever holds the whole model. transformers keeps only a
    weak reference to that object, so the zero.Init context ends with this function, before any other model
    (an online teacher) loads. `config` is the `ds_config` the engine will be built with.
    """
    from transformers import AutoModelForCausalLM

    load = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if config["zero_optimization"]["stage"] != 3:
        return AutoModelForCausalLM.from_pretrained(folder, **load)
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = HfDeepSpeedConfig(config)  # noqa: F841  (alive during from_pretrained, weakly referenced)
    return AutoModelForCausalLM.from_pretrained(folder, **load)


def enable_checkpointing(model: nn.Module) -> None:
    """Gradient checkpointing of every decoder layer: each layer's activations are recomputed in the backward
    pass, so a step holds one layer's activations (plus every layer's input) instead of all of them."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"{type(model).__name__} does not support gradient checkpointing; set "
            "training.gradient_checkpointing: false"
        )
    # Non-reentrant checkpointing: works with inputs that need no grad (token ids) and with ZeRO-3's hooks.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_engine(
    model: nn.Module, loss: KDLossConfig, config: dict[str, Any], checkpointing: bool = False
) -> Any:
    """A DeepSpeed engine over KDStudent(model); distributed must already be initialised."""
    import deepspeed

    if checkpointing:
        enable_checkpointing(model)
    model.train()  # from_pretrained returns eval mode; checkpointing (and dropout) act only in train mode
    module = KDStudent(model, loss)
    if config["zero_optimization"]["stage"] == 3:
        module.register_zero3()
    params = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=module, model_parameters=params, config=config)
    return engine


def init_single_process(backend: str = "gloo", port: int = 29510) -> None:
    """torch.distributed for one process without a launcher (benchmarks, tests); Ray Train does it itself."""
    import deepspeed

    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }.items():
        os.environ.setdefault(key, value)
    if backend == "gloo":
        from raykd._compat import skip_deepspeed_shm_comm

        skip_deepspeed_shm_comm()
    deepspeed.init_distributed(dist_backend=backend)


# ------------------------------------------------------------------------------------------ the step


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs formula needs. body_params: parameters outside the embeddings and lm_head."""

    body_params: int
    vocab: int
    hidden: int
    layers: int
    attn_dim: int  # heads x head_dim: the width of Q·Kᵀ and attention·V

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape:
        c = model.config
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        total = sum(_numel(p) for p in model.parameters())
        outside = _numel(embed) + (0 if head is embed else _numel(head))
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(
            total - outside,
            _rows(head),
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads * head_dim,
        )

    def forward_flops(self, forward_tokens: int, supervised_tokens: int, sq_len_sum: int) -> float:
        """Forward FLOPs (2 per multiply-add), padding excluded:

            2·N_body·T  +  2·V·d·S  +  2·n_layers·a·Σ L(L+1)

        T forwarded tokens, S supervised tokens (the vocabulary projection runs only there), and causal
        attention: Q·Kᵀ and attention·V each cost L(L+1)/2 dot products of width a per layer. A training step
        costs 3x its forward (backward = 2x), so student FLOPs = 3 x this; the online teacher adds 1 x its
        own.
        """
        return 2.0 * (
            self.body_params * forward_tokens
            + self.vocab * self.hidden * supervised_tokens
            + self.layers * self.attn_dim * sq_len_sum
        )


def _rows(p: Tensor) -> int:
    return int(getattr(p, "ds_shape", p.shape)[0])  # ZeRO-3 partitions keep the full shape in ds_shape


def _numel(p: Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitions leave p.numel() == 0


def to_device(mb: MicroBatch, device: torch.device) -> dict[str, Tensor]:
    arrays = {
        "input_ids": mb.input_ids,
        "flat_pos": mb.flat_pos,
        "target_ids": mb.target_ids,
        "segment": mb.segment,
        "topk_ids": mb.topk_ids,
        "topk_logprobs": mb.topk_logprobs,
        "has_teacher": mb.has_teacher,
    }
    return {
        k: torch.from_numpy(np.ascontiguousarray(v)).to(device, non_blocking=True) for k, v in arrays.items()
    }


def _all_reduce_sum(x: Tensor) -> Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def train_step(
    engine: Any,
    micro_batches: Sequence[MicroBatch],
    device: torch.device,
    student: ModelShape,
    teacher: OnlineTeacher | None = None,
    teacher_shape: ModelShape | None = None,
    all_reduce: Callable[[Tensor], Tensor] = _all_reduce_sum,
) -> dict[str, float]:
    """One optimizer step over this worker's micro-batches, however many (the last one is the boundary).

    Every worker must call it with as many micro-batches (dummies for missing data): gradient reductions
    are collectives. Returns this worker's sums (SUM_KEYS) plus 'step_tokens', the step's supervised tokens
    over all workers. A step with no supervised token on any worker runs nothing and leaves the weights and
    optimizer state as they were.
    """
    if not micro_batches:
        raise ValueError("a step needs at least one micro-batch (a dummy where this worker has no data)")
    local = torch.tensor([float(mb.n_targets) for mb in micro_batches]).sum().reshape(1)
    total = float(all_reduce(local.to(device))[0])
    sums = dict.fromkeys(SUM_KEYS, 0.0)
    sums["step_tokens"] = total
    if total == 0:
        return sums
    world = engine.dp_world_size if hasattr(engine, "dp_world_size") else 1
    for i, mb in enumerate(micro_batches):
        # The step's micro-batch count varies with a token budget: the engine's fixed accumulation count
        # must not decide where the optimizer steps.
        engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
        batch = to_device(mb, device)
        if teacher is not None:
            batch["teacher_hidden"] = teacher.hidden(batch["input_ids"], batch["flat_pos"])
            batch["teacher_weight"] = teacher.weight
        out = engine(**batch)
        engine.backward(out[0] * (mb.weight * world / total), scale_wrt_gas=False)
        engine.step()
        _accumulate(sums, out, mb, student, teacher_shape if teacher is not None else None)
    return sums


def _accumulate(
    sums: dict[str, float],
    out: tuple[Tensor, ...],
    mb: MicroBatch,
    student: ModelShape,
    teacher: ModelShape | None,
) -> None:
    if mb.weight == 0:
        sums["dummy_micro_batches"] += 1
        return
    loss, ce, kd, mass, kd_tokens, seg_ce, seg_kd, seg_tokens = (t.detach().float().cpu() for t in out)
    for key, value in (
        ("loss_sum", loss),
        ("ce_sum", ce),
        ("kd_sum", kd),
        ("topk_mass_sum", mass),
        ("kd_tokens", kd_tokens),
    ):
        sums[key] += float(value)
    for i, name in enumerate(("prompt", "cot", "answer")):
        sums[f"ce_{name}"] += float(seg_ce[i])
        sums[f"kd_{name}"] += float(seg_kd[i])
        sums[f"tokens_{name}"] += float(seg_tokens[i])
    sums["tokens"] += mb.n_targets
    sums["forward_tokens"] += mb.forward_tokens
    sums["kept_tokens"] += mb.kept_tokens
    sums["padded_tokens"] += mb.input_ids.size
    sums["sequences"] += len(mb.lengths)
    args = (mb.forward_tokens, mb.n_targets, mb.sq_len_sum)
    sums["flops"] += 3 * student.forward_flops(*args) + (teacher.forward_flops(*args) if teacher else 0.0)


# ------------------------------------------------------------------------------------------ memory


class PeakMemory:
    """Peak memory while training, above a baseline taken by `reset()`.

    GPU: the CUDA caching allocator's exact peak of allocated bytes. CPU (torch keeps no CPU allocator
    statistics): the kernel's resident-set high-water mark, reset by `echo 5 > /proc/self/clear_refs`, read
    as VmHWM (Linux >= 4.0); where that cannot be written, a thread samples the resident set every `interval`
    seconds. Freed memory leaves the resident set at once only for mmap-backed blocks: run with a fixed
    MALLOC_MMAP_THRESHOLD_ (the benchmarks do) for numbers that follow the live tensors.
    """

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval = device, interval
        self._peak = self._base = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.method = "cuda max_memory_allocated" if device.type == "cuda" else "VmHWM after clear_refs=5"

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _status_bytes("VmRSS")

    def reset(self) -> None:
        """Baseline = what the process holds now (weights, optimizer state); peaks are measured from here."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not _clear_refs():
            self.method = f"resident set sampled every {self.interval * 1000:g} ms"
            if self._thread is None:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        self._base = self._peak = self.current()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self.current())

    def peak(self) -> int:
        """Highest memory since reset(), in bytes (absolute)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self._thread is None:
            return _status_bytes("VmHWM")
        return max(self._peak, self.current())

    def above_baseline(self) -> int:
        return max(self.peak() - self._base, 0)

    def close(self) -> None:
        self._stop.set()


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status in bytes (0 where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _clear_refs() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current resident set."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(result, seconds), waiting for the GPU to finish."""
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


__all__ = [
    "SUM_KEYS",
    "KDStudent",
    "ModelShape",
    "OnlineTeacher",
    "PeakMemory",
    "build_engine",
    "check_vocab",
    "decoder",
    "ds_config",
    "enable_checkpointing",
    "init_single_process",
    "lm_head_weight",
    "load_student",
    "train_step",
]
