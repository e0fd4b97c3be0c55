"""Existing trace datasets (Bespoke-Stratos / OpenThoughts layout): no generation, one scoring pass.

    load_trace_dataset rows -> tokenize_traces (chat prompt + ``<think>`` completion, segments from character
    offsets, tasks) -> ScoreBatch (vLLM prompt logprobs over prompt + completion, actors) -> answer check ->
    the same Parquet shards, columns and store as generated traces

The completion is the dataset's text in ``<think>`` form (raykd.problems.sources ``think_completion``)
followed by the end-of-turn token of the teacher's chat template (raykd.chat), so the student learns the
same format as from generated traces. Its ids come from tokenizing that text (the only ids a text source
has); every id then gets the teacher's top-k at that position, exactly as a generated trace does. The
reference answer is the solution's last ``\\boxed{}``: a trace without one is 'unparseable' (nothing to
check it against). Traces whose completion is longer than ``generation.max_tokens`` are left out, as
generation would have cut them, and counted.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raykd.chat import end_of_turn, load_tokenizer
from raykd.engine import checks
from raykd.problems.tasks import Problem
from raykd.traces.chain import engine_config, run_engines, start_ray, stream_to_shards, supervises_prompt
from raykd.traces.stages import IDS, ScoreBatch, append_segments, list_column
from raykd.traces.store import TraceStore

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def trace_problems(path: str | Path) -> list[Problem]:
    """The problems of a trace dataset (id, prompt, reference answer or ''), e.g. to split train / eval."""
    from raykd.problems.sources import load_trace_dataset

    return [
        Problem(id=r["id"], prompt=r["prompt"], answer=r["answer"] or "") for r in load_trace_dataset(path)
    ]


def trace_rows(spec: Any, problems: list[Any]) -> dict[str, dict[str, Any]]:
    """Dataset rows by id, restricted to the ids of ``problems`` (all rows when ``problems`` is empty)."""
    from raykd.problems.sources import load_trace_dataset

    rows = {r["id"]: r for r in load_trace_dataset(spec.problems.path)}
    wanted = {p.id for p in problems} or set(rows)
    missing = sorted(wanted - set(rows))
    if missing:
        raise checks.SetupError(f"problems.path {spec.problems.path} has no trace with id {missing[0]!r}")
    return {i: rows[i] for i in wanted}


def tokenize_traces(batch: pa.Table, tokenizer_dir: str, max_tokens: int) -> pa.Table:
    """Chat prompt ids + completion ids (EOS appended) + segments from character offsets; rows whose
    completion exceeds ``max_tokens`` are dropped here and counted by the caller."""
    from raykd.segments_text import segment_texts

    tokenizer = load_tokenizer(tokenizer_dir)
    systems = batch.column("system").to_pylist()
    prompts = [
        tokenizer.apply_chat_template(_messages(s, p), add_generation_prompt=True, tokenize=False)
        for s, p in zip(systems, batch.column("prompt").to_pylist(), strict=True)
    ]
    texts = batch.column("completion_text").to_pylist()
    # A turn ends as the teacher's chat template ends one, which is where the trained student must stop.
    end = end_of_turn(tokenizer)
    seqs, seg = segment_texts(prompts, texts, tokenizer, THINK_OPEN, THINK_CLOSE, end)
    lengths = seqs.lengths
    prompt_lens = seg.prompt_ends
    rows = [seqs.row(i).astype(np.int32) for i in range(len(seqs))]
    completions = [r[prompt_lens[i] :] for i, r in enumerate(rows)]
    # The text as the ids spell it (EOS included), like a generated trace's completion_text.
    decoded = tokenizer.batch_decode(completions, skip_special_tokens=False)
    out = batch.drop_columns(["system", "completion_text"])
    out = out.append_column("prompt_ids", list_column([r[: prompt_lens[i]] for i, r in enumerate(rows)], IDS))
    out = out.append_column("completion_ids", list_column(completions, IDS))
    out = out.append_column("completion_text", pa.array(decoded, pa.string()))
    out = out.append_column("prompt_len", pa.array(prompt_lens.astype(np.int32)))
    out = append_segments(out, seg)
    return out.filter(pa.array(lengths - prompt_lens <= max_tokens))


def _messages(system: str | None, prompt: str) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": prompt}]


def run_scoring(
    spec: Any,
    store: TraceStore,
    shards: list[int],
    rows: dict[str, dict[str, Any]],
    tokenizer_dir: str,
    teacher_dir: str,
    batch_size: int,
) -> dict[str, Any]:
    """Tokenize, score and write the traces of ``shards``; returns this run's throughput figures."""
    gen = spec.generation
    start_ray(gen)
    items = [_item(rows[pid], shard) for shard in shards for pid in store.shard_problems[shard]]
    ds, kept = tokenized(items, tokenizer_dir, gen.max_tokens, batch_size)
    expected = dict.fromkeys(shards, 0)
    expected.update(Counter(kept.column("shard").to_pylist()))
    skipped = {"skipped_too_long": len(items) - kept.num_rows}
    if kept.num_rows == 0:  # every trace too long: nothing to score, no engine to start
        return {**stream_to_shards(None, store, expected, keep_all=True), **skipped}
    prompt_lens = kept.column("prompt_len").to_numpy()
    longest = int((prompt_lens + pc.list_value_length(kept.column("completion_ids")).to_numpy()).max())
    context = checks.model_context(teacher_dir)
    by_id = dict(zip(kept.column("problem_id").to_pylist(), prompt_lens.tolist(), strict=True))
    checks.check_context(by_id, gen.max_tokens, context, "generation", spec.teacher.model)
    # Scoring generates one token after the whole trace; never ask for more than the model holds.
    max_model_len = min(longest + 1, context or longest + 1)
    engine = engine_config(spec, teacher_dir, tokenizer_dir, max_model_len)
    stage_kwargs = {"engine": engine, "k": gen.logprobs_k, "prompt_logprobs": supervises_prompt(spec)}
    ds = ds.drop_columns(["prompt_len"])
    run = run_engines(spec, ds, ScoreBatch, stage_kwargs, store, expected, tokenizer_dir, batch_size)
    return {**run, **skipped}


def tokenized(
    items: list[dict[str, Any]], tokenizer_dir: str, max_tokens: int, batch_size: int
) -> tuple[Any, pa.Table]:
    """The traces tokenized and segmented (materialized: small), and their ids, shards and lengths."""
    import ray

    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))
    ds = ds.map_batches(
        tokenize_traces, batch_format="pyarrow", batch_size=batch_size, fn_args=(tokenizer_dir, max_tokens)
    ).materialize()
    refs = ds.select_columns(["problem_id", "shard", "prompt_len", "completion_ids"]).to_arrow_refs()
    return ds, pa.concat_tables(ray.get(refs))


def _item(row: dict[str, Any], shard: int) -> dict[str, Any]:
    return {
        "problem_id": row["id"],
        "sample_index": 0,
        "prompt": row["prompt"],
        "system": row["system"],
        "reference": row["answer"],  # None: nothing to check against -> 'unparseable'
        "completion_text": row["think_completion"],
        "shard": shard,
    }
