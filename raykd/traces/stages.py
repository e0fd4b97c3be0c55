"""The Ray Data stages of the trace chain; each takes and returns a pyarrow Table (one batch).

    render_prompts (tasks)  ->  GenerateBatch / ScoreBatch (actor pool, one vLLM engine each)  ->
    check_and_segment (tasks)

Tokenizers and think-tag tables are loaded once per worker process (cached), not once per batch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from raykd.chat import chat_prompt_ids, load_tokenizer
from raykd.engine.config import EngineConfig, request_seed
from raykd.engine.outputs import tail_mass
from raykd.engine.vllm_engine import VllmEngine

IDS = pa.list_(pa.int32())
VALUES = pa.list_(pa.float32())
ENGINE_COLUMNS: dict[str, pa.DataType] = {
    "completion_ids": IDS,
    "finish_reason": pa.string(),
    "topk_ids": IDS,
    "topk_logprobs": VALUES,
    "sampled_logprobs": VALUES,
    "tail_mass": VALUES,
    "prompt_topk_ids": IDS,
    "prompt_topk_logprobs": VALUES,
    "prompt_tail_mass": VALUES,
}


@functools.lru_cache(maxsize=4)
def think_tags(tokenizer_dir: str) -> Any:
    from raykd.segments import ThinkTags

    return ThinkTags.from_tokenizer(load_tokenizer(tokenizer_dir))


def list_column(rows: Sequence[np.ndarray], type_: pa.DataType) -> pa.Array:
    """A list<...> Arrow column from per-row numpy arrays, built from offsets (no per-element Python)."""
    value_type = type_.value_type.to_pandas_dtype()
    lengths = np.fromiter((len(r) for r in rows), np.int32, len(rows))
    offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(rows).astype(value_type) if rows else np.zeros(0, value_type)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


# --- stage 1: render prompts ----------------------------------------------------------------------------


def render_prompts(batch: pa.Table, tokenizer_dir: str, trust_remote_code: bool = False) -> pa.Table:
    """Add ``prompt_ids`` (chat-formatted) and ``prompt_len`` to rows holding a ``prompt`` column."""
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code)
    ids = [np.asarray(chat_prompt_ids(tokenizer, p), np.int32) for p in batch.column("prompt").to_pylist()]
    batch = batch.append_column("prompt_ids", list_column(ids, IDS))
    return batch.append_column("prompt_len", pa.array([len(i) for i in ids], pa.int32()))


# --- stage 2: the engine actors -------------------------------------------------------------------------


class GenerateBatch:
    """Ray Data actor: one vLLM engine; each input row (a problem) becomes ``samples`` trace rows.

    A batch (a whole shard by default, raykd.traces.pipeline.DEFAULT_BATCH_SIZE) goes to the engine in one
    `generate` call, never in fixed groups: vLLM's continuous batching then keeps its max_num_seqs slots
    full, refilling each as a sequence ends, and waits for a longest sequence only once per batch.
    """

    def __init__(self, engine: EngineConfig, sampling: dict[str, Any], samples: int, tokenizer_dir: str):
        self.engine = VllmEngine(engine)
        self.sampling, self.samples = sampling, samples
        self.tokenizer = load_tokenizer(tokenizer_dir, engine.trust_remote_code)

    def __call__(self, batch: pa.Table) -> pa.Table:
        # Seeds follow (problem_id, sample_index), so a trace is the same under any batching or sharding.
        rows = np.repeat(np.arange(batch.num_rows), self.samples)
        sample_index = np.tile(np.arange(self.samples, dtype=np.int32), batch.num_rows)
        problem_ids = batch.column("problem_id").to_pylist()
        prompts = batch.column("prompt_ids").to_pylist()
        seeds = [request_seed(problem_ids[r], int(s)) for r, s in zip(rows, sample_index, strict=True)]
        # One call for the whole batch; vLLM returns the outputs in request order, so row i is request i.
        outputs = self.engine.generate([prompts[r] for r in rows], seeds, self.sampling)
        out = batch.drop_columns(["prompt_len"]).take(pa.array(rows))
        out = out.append_column("sample_index", pa.array(sample_index, pa.int32()))
        out = out.append_column("k", pa.array(np.full(len(rows), self.sampling["logprobs"], np.int32)))
        texts = self.tokenizer.batch_decode([o["completion_ids"] for o in outputs], skip_special_tokens=False)
        out = out.append_column("completion_text", pa.array(texts, pa.string()))
        return append_engine_columns(out, outputs, self.engine.ready_at)


class ScoreBatch:
    """Ray Data actor for existing traces: teacher-force prompt + completion and keep the top-k per position.

    Gives the same columns as generation: completion rows from the scored sequence, ``sampled_logprobs`` the
    teacher's logprob of each token the trace holds, prompt rows too when ``prompt_logprobs`` is set.
    """

    def __init__(self, engine: EngineConfig, k: int, prompt_logprobs: bool):
        self.engine = VllmEngine(engine)
        self.k, self.prompt_logprobs = k, prompt_logprobs

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = batch.column("prompt_ids").to_pylist()
        completions = batch.column("completion_ids").to_pylist()
        scored = self.engine.score([p + c for p, c in zip(prompts, completions, strict=True)], self.k)
        outputs = [self._split(ids, values, len(p)) for (ids, values), p in zip(scored, prompts, strict=True)]
        out = batch.drop_columns(["completion_ids"])
        out = out.append_column("k", pa.array(np.full(batch.num_rows, self.k, np.int32)))
        return append_engine_columns(out, outputs, self.engine.ready_at)

    def _split(self, ids: np.ndarray, values: np.ndarray, n_prompt: int) -> dict[str, Any]:
        # Row j describes token j + 1: completion token i (position n_prompt + i) is row n_prompt + i - 1.
        tail = slice(n_prompt - 1, None)
        head = slice(0, n_prompt - 1) if self.prompt_logprobs else slice(0, 0)
        return {
            "completion_ids": ids[tail, 0].copy(),
            "finish_reason": "stop",
            "topk_ids": ids[tail, 1:].reshape(-1),
            "topk_logprobs": values[tail, 1:].reshape(-1),
            "sampled_logprobs": values[tail, 0].copy(),
            "tail_mass": tail_mass(values[tail, 1:]),
            "prompt_topk_ids": ids[head, 1:].reshape(-1),
            "prompt_topk_logprobs": values[head, 1:].reshape(-1),
            "prompt_tail_mass": tail_mass(values[head, 1:]),
        }


def append_engine_columns(table: pa.Table, outputs: list[dict[str, Any]], ready_at: float) -> pa.Table:
    table = table.append_column("ready_at", pa.array(np.full(table.num_rows, ready_at)))
    for name, type_ in ENGINE_COLUMNS.items():
        values = [o[name] for o in outputs]
        column = list_column(values, type_) if pa.types.is_list(type_) else pa.array(values, type_)
        table = table.append_column(name, column)
    return table


# --- stage 3: answer check and segmentation -------------------------------------------------------------


def check_and_segment(batch: pa.Table, tokenizer_dir: str, check_kind: str) -> pa.Table:
    """Add status / pred (answer check), segments and segmentation metadata (raykd.segments) to trace rows.

    Rows that already hold ``segments`` (text sources, segmented by character offsets) keep them."""
    from raykd.problems.answers import status
    from raykd.segments import Ragged, segment_ids

    verdicts = [
        status(t, r, f, check_kind)
        for t, r, f in zip(
            batch.column("completion_text").to_pylist(),
            batch.column("reference").to_pylist(),
            batch.column("finish_reason").to_pylist(),
            strict=True,
        )
    ]
    batch = batch.append_column("status", pa.array([v[0] for v in verdicts], pa.string()))
    batch = batch.append_column("pred", pa.array([v[1] for v in verdicts], pa.string()))
    if "segments" in batch.column_names:
        return batch
    prompts = batch.column("prompt_ids").to_pylist()
    sequences = [p + c for p, c in zip(prompts, batch.column("completion_ids").to_pylist(), strict=True)]
    seg = segment_ids(
        Ragged.from_rows(sequences), np.array([len(p) for p in prompts]), think_tags(tokenizer_dir)
    )
    return append_segments(batch, seg)


def append_segments(table: pa.Table, seg: Any) -> pa.Table:
    """Add a segmentation (raykd.segments, one row per table row) as the ``segments`` column (run offsets
    with their labels) and the metadata columns of `segment_meta`."""
    table = table.append_column(
        "segments", pa.ListArray.from_arrays(pa.array(seg.offsets.astype(np.int32)), pa.array(seg.labels()))
    )
    for name, values in segment_meta(seg).items():
        table = table.append_column(name, pa.array(values))
    return table


def segment_meta(seg: Any) -> dict[str, np.ndarray]:
    """Per-row segmentation metadata columns: boundaries (positions in prompt + completion) and flag bits."""
    return {
        "close_start": seg.close_starts.astype(np.int32),  # first token of the last </think>, -1 if none
        "answer_start": seg.answer_starts.astype(np.int32),  # first ANSWER position (= length if none)
        "seg_flags": seg.flags.astype(np.uint16),  # raykd.segments.SegFlag bits
    }


SEGMENT_FIELDS = [
    pa.field("close_start", pa.int32()),
    pa.field("answer_start", pa.int32()),
    pa.field("seg_flags", pa.uint16()),
]
