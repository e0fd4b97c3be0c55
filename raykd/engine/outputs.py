"""vLLM request outputs -> flat numpy arrays: per position the chosen token and the top-k (ids, logprobs),
and the probability left outside the top-k. Light: numpy only; the outputs are duck-typed.
"""

from __future__ import annotations

from typing import Any

import numpy as np


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
