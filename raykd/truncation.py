"""Truncation policies, loss masks and per-example metadata for segmented ragged batches.

A policy gives each example a keep window [start, end) of its full sequence (positions relative to the
sequence start). Truncation then removes every token outside the window (`take_windows` gathers the kept
tokens of any per-token array: ids, labels, the teacher's top-k), so the forward pass shrinks with it; nothing
is only masked. Policies:
- "lead_span": the first ceil(f * L) tokens of the whole sequence, prompt included, at least 1 (the paper's
  lead-span proportion; it truncates with int(f * L), we round up so that no example is ever empty). f is
  read as the nearest fraction with a denominator of at most 10**6, so 0.3 means exactly 3/10.
- "window_left" / "window_middle" / "window_right": a window of the same length ceil(f * L) at the start,
  centre (floor of the slack on the left) or end of the sequence (the paper's left/middle/right 50% ablation
  at f = 0.5).
- "cut_after_think": everything up to the end of the last `</think>`, i.e. the answer dropped (with no think
  tag at all the completion is the answer, so only the prompt is left; at least 1 token).
- "budget_matched": the whole sequence; `budget_matched` (the function) then picks the token-budget matched
  control: full-length examples, only as many as fit the token budget of a lead-span run at fraction f.
These are the names the spec accepts (training.truncation_policy).

Loss masks mark target tokens: mask[t] means token t is a label, predicted from position t - 1, so the first
token of every kept window is never marked (nothing predicts it). Labels only on the chosen segments, after
truncation: a segment the window removed is empty, never an error.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from raykd.segments import ANSWER, COT, PROMPT, SEGMENTS, Ragged, Segmentation, segment_labels

POLICIES = ("lead_span", "window_left", "window_middle", "window_right", "cut_after_think", "budget_matched")
_WINDOWS = {
    "lead_span": "left",
    "window_left": "left",
    "window_middle": "middle",
    "window_right": "right",
}
_MAX_DENOMINATOR = 10**6


@dataclass(frozen=True, eq=False)
class Windows:
    """Keep windows: starts, ends (n,) int64, positions relative to each sequence's start."""

    starts: np.ndarray
    ends: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return self.ends - self.starts


def as_fraction(fraction: float) -> Fraction:
    """The exact fraction that `fraction` stands for (denominator <= 10**6); must lie in (0, 1]."""
    if not 0 < fraction <= 1:
        raise ValueError(f"truncation fraction {fraction} is not in (0, 1]; use a fraction of tokens to keep")
    return Fraction(fraction).limit_denominator(_MAX_DENOMINATOR)


def kept_lengths(lengths: np.ndarray, fraction: float) -> np.ndarray:
    """(n,) int64 max(1, ceil(f * L)), in exact integer arithmetic. lengths: (n,) full lengths L."""
    f = as_fraction(fraction)
    lengths = np.asarray(lengths, np.int64)
    return np.maximum(-((-f.numerator * lengths) // f.denominator), 1)


def window(lengths: np.ndarray, fraction: float, position: str = "left") -> Windows:
    """Windows of ceil(f * L) tokens at the left (lead span), middle or right of each sequence."""
    lengths = np.asarray(lengths, np.int64)
    keep = np.minimum(kept_lengths(lengths, fraction), lengths)  # an empty sequence keeps nothing
    slack = lengths - keep
    offsets = {"left": np.zeros_like(slack), "middle": slack // 2, "right": slack}
    if position not in offsets:
        raise ValueError(f"window position {position!r} is not one of {sorted(offsets)}")
    return Windows(offsets[position], offsets[position] + keep)


def cut_after_think(seg: Segmentation) -> Windows:
    """Keep [0, answer_start): everything up to the end of the last `</think>`, at least 1 token."""
    ends = np.minimum(np.maximum(seg.answer_starts, 1), seg.lengths)
    return Windows(np.zeros_like(ends), ends)


def make_windows(policy: str, seg: Segmentation, fraction: float = 1.0) -> Windows:
    """Keep windows for one of POLICIES (lead_span = window_left); cut_after_think and budget_matched ignore
    the fraction."""
    lengths = seg.lengths
    if policy in _WINDOWS:
        return window(lengths, fraction, _WINDOWS[policy])
    if policy == "cut_after_think":
        return cut_after_think(seg)
    if policy == "budget_matched":
        return Windows(np.zeros_like(lengths), lengths.copy())
    raise ValueError(f"truncation policy {policy!r} is not one of {list(POLICIES)}")


def budget_matched(lengths: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of the examples kept at full length by the token-budget matched control.

    The budget is what a lead-span run at `fraction` trains on, sum(max(1, ceil(f * L))). Examples are taken
    in a random order fixed by `seed` while the sum of their full lengths stays within the budget; the first
    one that does not fit ends the selection. Returns (k,) int64 in that order (possibly empty).
    """
    lengths = np.asarray(lengths, np.int64)
    budget = int(kept_lengths(lengths, fraction).sum()) if len(lengths) else 0
    order = np.random.default_rng(seed).permutation(len(lengths))
    count = int(np.searchsorted(np.cumsum(lengths[order]), budget, side="right"))
    return order[:count].astype(np.int64)


def take_windows(values: np.ndarray, offsets: np.ndarray, windows: Windows) -> Ragged:
    """Gather the kept rows of a ragged per-token array. values: (total, ...) -> (kept_total, ...)."""
    keep = windows.lengths
    new_offsets = np.zeros(len(keep) + 1, np.int64)
    np.cumsum(keep, out=new_offsets[1:])
    # index of kept token j of example i: offsets[i] + starts[i] + (j - new_offsets[i])
    shift = np.repeat(offsets[:-1] + windows.starts - new_offsets[:-1], keep)
    shift += np.arange(new_offsets[-1], dtype=np.int64)
    return Ragged(values[shift], new_offsets)


def kept_segment_lengths(seg: Segmentation, windows: Windows) -> np.ndarray:
    """(n, 3) int64 tokens of P, CoT, A inside each window (interval overlaps, no per-token work)."""
    bounds = np.stack([np.zeros_like(seg.prompt_ends), seg.prompt_ends, seg.answer_starts, seg.lengths], 1)
    clipped = np.clip(bounds, windows.starts[:, None], windows.ends[:, None])
    return np.diff(clipped, axis=1)


def kept_labels(seg: Segmentation, windows: Windows) -> Ragged:
    """int8 segment labels of the kept tokens (a window of a P, CoT, A partition is one too)."""
    per_segment = kept_segment_lengths(seg, windows)
    offsets = np.zeros(len(per_segment) + 1, np.int64)
    np.cumsum(per_segment.sum(axis=1), out=offsets[1:])
    return Ragged(segment_labels(per_segment), offsets)


def segment_codes(segments: Collection[str]) -> np.ndarray:
    """(3,) bool table: which segment ids are supervised. segments: a non-empty subset of SEGMENTS."""
    unknown = set(segments) - set(SEGMENTS)
    if not segments or unknown:
        raise ValueError(f"segments {sorted(segments)} must be a non-empty subset of {list(SEGMENTS)}")
    table = np.zeros(3, bool)
    table[[SEGMENTS[s] for s in segments]] = True
    return table


def loss_mask(labels: Ragged, segments: Collection[str]) -> np.ndarray:
    """(kept_total,) bool targets: tokens of the chosen segments, minus each row's first token."""
    mask = segment_codes(segments)[labels.values]
    firsts = labels.offsets[:-1][labels.lengths > 0]
    mask[firsts] = False
    return mask


def random_label_mask(mask: np.ndarray, drop_ratio: float, seed: int) -> np.ndarray:
    """Drop each target with probability drop_ratio (a control: fewer labels, same compute). mask: (tokens,).

    Deterministic for a given batch and seed.
    """
    if not 0 <= drop_ratio < 1:
        raise ValueError(f"label drop ratio {drop_ratio} is not in [0, 1)")
    if drop_ratio == 0:
        return mask.copy()
    keep = np.random.default_rng(seed).random(mask.shape[0], dtype=np.float32) >= drop_ratio
    return mask & keep


@dataclass(frozen=True, eq=False)
class ExampleMeta:
    """Per-example facts after truncation, for logging and Parquet columns.

    kept: (n,) tokens kept. kept_per_segment / supervised_per_segment: (n, 3) tokens of P, CoT, A kept /
    carrying a label. close_tag_kept: (n,) the last `</think>` lies wholly inside the window (False when there
    is none). answer_kept: (n,) the example has an answer and all of it was kept.
    """

    kept: np.ndarray
    kept_per_segment: np.ndarray
    supervised_per_segment: np.ndarray
    close_tag_kept: np.ndarray
    answer_kept: np.ndarray

    @property
    def supervised(self) -> np.ndarray:
        return self.supervised_per_segment.sum(axis=1)

    def counts(self) -> dict[str, int]:
        sup = self.supervised_per_segment.sum(axis=0)
        return {
            "examples": len(self.kept),
            "kept_tokens": int(self.kept.sum()),
            "supervised_tokens": int(sup.sum()),
            "supervised_prompt": int(sup[PROMPT]),
            "supervised_cot": int(sup[COT]),
            "supervised_answer": int(sup[ANSWER]),
            "no_supervised_tokens": int(np.count_nonzero(self.supervised == 0)),
            "close_tag_kept": int(np.count_nonzero(self.close_tag_kept)),
            "answer_kept": int(np.count_nonzero(self.answer_kept)),
        }


def example_meta(seg: Segmentation, windows: Windows, mask: Ragged) -> ExampleMeta:
    """Metadata for windows of `seg` and a target mask over the kept tokens (mask.offsets: kept rows)."""
    per_segment = kept_segment_lengths(seg, windows)
    # supervised tokens per segment = differences of the mask's running count at the segment boundaries
    running = np.zeros(len(mask.values) + 1, np.int64)
    np.cumsum(mask.values, out=running[1:])
    bounds = mask.offsets[:-1, None] + np.concatenate(
        [np.zeros((len(seg.lengths), 1), np.int64), np.cumsum(per_segment, axis=1)], axis=1
    )
    has_close = seg.close_starts >= 0
    answer_len = seg.lengths - seg.answer_starts
    return ExampleMeta(
        kept=windows.lengths,
        kept_per_segment=per_segment,
        supervised_per_segment=np.diff(running[bounds], axis=1),
        close_tag_kept=has_close & (windows.starts <= seg.close_starts) & (seg.answer_starts <= windows.ends),
        answer_kept=(answer_len > 0) & (windows.starts <= seg.answer_starts) & (windows.ends == seg.lengths),
    )


@dataclass(frozen=True, eq=False)
class TruncatedBatch:
    """A batch after truncation: ids and labels of the kept tokens, target mask (kept_total,), metadata."""

    ids: Ragged
    labels: Ragged
    mask: np.ndarray
    meta: ExampleMeta


def truncate_batch(
    ids: Ragged,
    seg: Segmentation,
    windows: Windows,
    segments: Collection[str],
    drop_ratio: float = 0.0,
    seed: int = 0,
) -> TruncatedBatch:
    """Truncate, label and mask one batch: the call the training collation makes.

    ids: ragged full sequences, rows matching seg; windows: from a policy; segments: supervised segment names;
    drop_ratio > 0 adds random label masking (the no-compute-saved control).
    """
    kept_ids = take_windows(ids.values, ids.offsets, windows)
    labels = kept_labels(seg, windows)
    mask = random_label_mask(loss_mask(labels, segments), drop_ratio, seed)
    meta = example_meta(seg, windows, Ragged(mask, labels.offsets))
    return TruncatedBatch(kept_ids, labels, mask, meta)
