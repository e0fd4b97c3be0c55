"""The parts of the trace chain that generation (`raykd.traces.pipeline`) and scoring of existing traces
(`raykd.traces.existing`) share: the content key, the engine settings, the engine pool and the shard writer.

    ... -> engine stage (GenerateBatch or ScoreBatch on a pool of actors) -> check_and_segment -> shards
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from raykd.engine import checks as engine_checks
from raykd.engine.config import EngineConfig, unwrap_start_error
from raykd.engine.placement import engine_remote_args
from raykd.models import content_id
from raykd.traces.store import TraceStore, fingerprint_path, problems_digest

# The generation settings that decide a trace's content, per source; scored traces are never sampled.
_CONTENT_SETTINGS = {
    "generate": {"samples_per_prompt", "temperature", "top_p", "max_tokens", "logprobs_k", "filter"},
    "traces": {"max_tokens", "logprobs_k", "filter"},
}


def supervises_prompt(spec: Any) -> bool:
    """Prompt logprobs are captured only when some trial puts the prompt in its loss."""
    return any("prompt" in segments for segments in spec.sweep.segments)


def key_material(spec: Any, problems: list[Any], tokenizer_dir: str, teacher_dir: str) -> dict[str, Any]:
    """Everything that decides the traces' content, and nothing about the run (engines, GPUs, paths).
    Existing traces (``problems.source: traces``) are keyed by their dataset's content as well."""
    source = "traces" if spec.problems.source == "traces" else "generate"
    material = {
        "source": source,
        "problems": problems_digest(problems),
        # A hub snapshot by its commit, a folder by its content (raykd.models.content_id).
        "teacher": content_id(teacher_dir),
        "tokenizer": content_id(tokenizer_dir),
        "answer_check": spec.problems.answer_check,
        "generation": spec.generation.model_dump(include=_CONTENT_SETTINGS[source]),
        "prompt_logprobs": supervises_prompt(spec),
    }
    if source == "traces":
        material["traces"] = fingerprint_path(spec.problems.path)
    return material


def engine_config(spec: Any, teacher_dir: str, tokenizer_dir: str, max_model_len: int) -> EngineConfig:
    """The teacher engine of spec.generation."""
    gen = spec.generation
    return EngineConfig(
        model=teacher_dir,
        tokenizer=tokenizer_dir,
        max_model_len=max_model_len,
        max_logprobs=gen.logprobs_k,
        gpus=gen.gpus_per_engine,
        tensor_parallel=gen.tensor_parallel,
        trust_remote_code=spec.teacher.trust_remote_code,
        gpu_memory_utilization=gen.gpu_memory_utilization,
        max_num_batched_tokens=gen.max_num_batched_tokens,
        max_num_seqs=gen.max_num_seqs,
        dtype=gen.dtype,
        enforce_eager=gen.enforce_eager,
    )


def start_ray(gen: Any) -> None:
    """Join the running Ray instance (or start a local one) and check that an engine fits its GPUs."""
    import ray

    if not ray.is_initialized():
        ray.init()
    engine_checks.check_gpus(gen.engines, gen.gpus_per_engine, ray.cluster_resources().get("GPU", 0))


def run_engines(
    spec: Any,
    ds: Any,
    stage: type,
    stage_kwargs: dict[str, Any],
    store: TraceStore,
    expected: dict[int, int],
    tokenizer_dir: str,
    batch_size: int,
) -> dict[str, Any]:
    """The chain's tail: ``stage`` (an engine actor class, GenerateBatch or ScoreBatch) on a pool of
    spec.generation.engines actors, then the answer check and segmentation, then the shards written as they
    complete. Returns this run's throughput figures."""
    import ray

    from raykd.traces.stages import check_and_segment

    gen = spec.generation
    # Each engine's start-up output goes to the trace folder's log (raykd.logs), not the console.
    engine = dataclasses.replace(stage_kwargs["engine"], log_file=str(store.root / "engine.log"))
    stage_kwargs = {**stage_kwargs, "engine": engine}
    ds = ds.map_batches(
        stage,
        batch_format="pyarrow",
        batch_size=batch_size,
        fn_constructor_kwargs=stage_kwargs,
        compute=ray.data.ActorPoolStrategy(size=gen.engines),
        **engine_remote_args(gen.gpus_per_engine, gen.tensor_parallel, gen.engine_resources),
    )
    ds = ds.map_batches(
        check_and_segment, batch_format="pyarrow", fn_args=(tokenizer_dir, spec.problems.answer_check)
    )
    return stream_to_shards(ds, store, expected, keep_all=gen.filter == "keep_all")


def stream_to_shards(ds: Any, store: TraceStore, expected: dict[int, int], keep_all: bool) -> dict[str, Any]:
    """Execute the chain (Ray Data's progress bars show it) and write each shard as it completes; ``ds`` is
    the chain's Dataset, or None when no shard has a row to wait for."""
    from raykd.traces.writer import ShardWriter

    writer = ShardWriter(store, expected, keep_all)
    writer.write_empty()
    start = time.time()
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None) if ds is not None else ():
            writer.add(batch)
    except Exception as error:
        clear = unwrap_start_error(error)
        if clear is error:
            raise
        raise clear from error
    end = time.time()
    if writer.missing():
        raise RuntimeError(
            f"the trace chain ended with shards {writer.missing()} incomplete; run again to finish"
        )
    ready = writer.first_ready or start
    return {
        "shards_generated": len(writer.written),
        "run_generated_tokens": writer.generated_tokens,
        "run_seconds": round(end - start, 2),
        "engine_startup_s": round(ready - start, 2),
        "tokens_per_s": round(writer.generated_tokens / max(end - ready, 1e-9), 1),
    }
