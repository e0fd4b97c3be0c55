"""Synthetic KD inputs for tests and benchmarks: trace rows in the agreed schema and tiny random Llama models.

The traces are learnable (each completion is an arithmetic progression modulo the content vocabulary, so a
2-layer student's loss falls within a few steps) and proportioned like reasoning traces: a short prompt, a
long chain of thought between <think> and </think>, a short answer, EOS. The teacher's top-k rows put most
mass on the true next token. Nothing here is used by a real sweep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from raykd.segments import ANSWER, COT, PROMPT

PAD, EOS, THINK_OPEN, THINK_CLOSE = 0, 1, 2, 3
FIRST_CONTENT = 4


def _progression(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    span = vocab - FIRST_CONTENT
    start, step = rng.integers(span), rng.integers(1, 4)
    return (FIRST_CONTENT + (start + step * np.arange(n)) % span).astype(np.int32)


def _topk(targets: np.ndarray, vocab: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows whose first id is the target: ids (t * k,) int32, logprobs (t * k,) float32, mass < 1."""
    ids = (targets[:, None] + np.arange(k)) % vocab
    mass = rng.uniform(0.85, 0.97, size=(len(targets), 1))
    probs = mass * np.exp(-1.5 * np.arange(k)) / np.exp(-1.5 * np.arange(k)).sum()
    return ids.astype(np.int32).reshape(-1), np.log(probs).astype(np.float32).reshape(-1)


def synthetic_rows(
    n: int,
    vocab: int = 256,
    k: int = 8,
    prompt_len: tuple[int, int] = (8, 16),
    cot_len: tuple[int, int] = (40, 80),
    answer_len: tuple[int, int] = (3, 6),
    seed: int = 0,
    prompt_logprobs: bool = False,
) -> dict[str, list[Any]]:
    """n trace rows as column lists (raykd.traces.store.trace_schema). Lengths are inclusive ranges."""
    if k > vocab:
        raise ValueError(f"k = {k} exceeds the vocabulary ({vocab})")
    rng = np.random.default_rng(seed)
    cols: dict[str, list[Any]] = {name: [] for name in _SCHEMA}
    for i in range(n):
        p = _progression(rng, int(rng.integers(prompt_len[0], prompt_len[1] + 1)), vocab)
        cot = _progression(rng, int(rng.integers(cot_len[0], cot_len[1] + 1)), vocab)
        ans = _progression(rng, int(rng.integers(answer_len[0], answer_len[1] + 1)), vocab)
        completion = np.concatenate([[THINK_OPEN], cot, [THINK_CLOSE], ans, [EOS]]).astype(np.int32)
        ids, lps = _topk(completion, vocab, k, rng)
        p_ids, p_lps = _topk(p[1:], vocab, k, rng) if prompt_logprobs else (np.zeros(0, np.int32),) * 2
        segments = np.concatenate(
            [np.full(len(p), PROMPT), np.full(len(cot) + 2, COT), np.full(len(ans) + 1, ANSWER)]
        )
        row = {
            "problem_id": f"p{i:05d}",
            "sample_index": 0,
            "prompt": "",
            "reference": "",
            "prompt_ids": p,
            "completion_ids": completion,
            "completion_text": "",
            "finish_reason": "stop",
            "k": k,
            "topk_ids": ids,
            "topk_logprobs": lps,
            "sampled_logprobs": lps[::k].copy(),
            "prompt_topk_ids": p_ids,
            "prompt_topk_logprobs": p_lps.astype(np.float32),
            "status": "correct",
            "pred": None,
            "segments": segments.astype(np.int8),
        }
        for name, value in row.items():
            cols[name].append(value)
    return cols


_SCHEMA = (
    "problem_id",
    "sample_index",
    "prompt",
    "reference",
    "prompt_ids",
    "completion_ids",
    "completion_text",
    "finish_reason",
    "k",
    "topk_ids",
    "topk_logprobs",
    "sampled_logprobs",
    "prompt_topk_ids",
    "prompt_topk_logprobs",
    "status",
    "pred",
    "segments",
)


def write_traces(cols: dict[str, list[Any]], folder: str | Path, files: int = 2) -> Path:
    """Write the rows as `files` Parquet files (several, so that Ray Data has blocks to split)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {
        "sample_index": pa.int32(),
        "k": pa.int32(),
        "prompt_ids": pa.list_(pa.int32()),
        "completion_ids": pa.list_(pa.int32()),
        "topk_ids": pa.list_(pa.int32()),
        "topk_logprobs": pa.list_(pa.float32()),
        "sampled_logprobs": pa.list_(pa.float32()),
        "prompt_topk_ids": pa.list_(pa.int32()),
        "prompt_topk_logprobs": pa.list_(pa.float32()),
        "segments": pa.list_(pa.int8()),
        "pred": pa.string(),
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(cols["problem_id"])
    bounds = np.linspace(0, n, files + 1).astype(int)
    for f in range(files):
        part = {
            name: pa.array([_plain(v) for v in values[bounds[f] : bounds[f + 1]]], types.get(name))
            for name, values in cols.items()
        }
        pq.write_table(pa.table(part), folder / f"part-{f:03d}.parquet")
    return folder


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def tiny_llama(
    vocab: int = 256,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    max_positions: int = 4096,
) -> Any:
    """A random LlamaForCausalLM (head_dim = hidden / heads >= 32 keeps vLLM's CPU attention happy)."""
    import torch

    from raykd.embedded.recipe import ModelSize, new_llama

    torch.manual_seed(seed)
    size = ModelSize(layers=layers, hidden=hidden, heads=heads, intermediate=hidden * 2)
    return new_llama(size, vocab, eos=EOS, pad=PAD, max_positions=max_positions)
