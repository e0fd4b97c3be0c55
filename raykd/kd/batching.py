"""From training examples to length-grouped, padded micro-batches: one worker's epochs.

Pure numpy (no torch, Ray or DeepSpeed). Examples come from `raykd.kd.examples`.

1. `plan_epoch`: a seeded shuffle per epoch, then length grouping (sort by length inside mega-batches of
   MEGABATCH_MICROS micro-batches, as Hugging Face's LengthGroupedSampler does) so that a micro-batch pads to
   sequences of similar length; steps are then shuffled so that lengths do not drift through the epoch.
   `plan_epoch_tokens` does the same with micro-batches bounded by a token budget.
2. `collate`: one micro-batch, right-padded to its own longest sequence (dynamic padding).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from raykd.kd.examples import Example

MEGABATCH_MICROS = 64  # micro-batches sorted by length together; larger pads less but groups lengths more


def plan_epoch(
    lengths: Sequence[int] | np.ndarray, micro_batch_size: int, accumulation: int, seed: int, epoch: int
) -> list[list[list[int]]]:
    """Length-grouped optimizer steps for one epoch of one worker, micro-batches of a fixed sequence count.

    lengths: (n,) forwarded tokens per example. Returns ceil(n / per_step) steps; each holds `accumulation`
    micro-batches, each a list of at most `micro_batch_size` example indices. Every example appears once; the
    last step may hold fewer sequences and empty micro-batches, which a worker runs as
    zero-weight dummies (as it does for the steps a shorter shard lacks), so all workers take as many steps.
    """
    steps = _grouped_steps(lengths, micro_batch_size * accumulation, accumulation, seed, epoch)
    out = []
    for chunk in steps:
        micros = [chunk[m : m + micro_batch_size] for m in range(0, len(chunk), micro_batch_size)]
        out.append(micros + [[] for _ in range(accumulation - len(micros))])
    return out


def plan_epoch_tokens(
    lengths: Sequence[int] | np.ndarray,
    step_sequences: int,
    micro_batch_size: int,
    micro_batch_tokens: int,
    seed: int,
    epoch: int,
) -> list[list[list[int]]]:
    """Length-grouped optimizer steps whose micro-batches are bounded by a token budget.

    Each step holds `step_sequences` examples (the last one fewer), split by `split_by_tokens`, so steps hold
    different numbers of micro-batches; the worker pads every step to the most any worker needs for it.
    """
    nominal = -(-step_sequences // micro_batch_size)
    lengths = np.asarray(lengths, np.int64)
    steps = _grouped_steps(lengths, step_sequences, nominal, seed, epoch)
    return [split_by_tokens(chunk, lengths, micro_batch_size, micro_batch_tokens) for chunk in steps]


def _grouped_steps(
    lengths: Sequence[int] | np.ndarray, per_step: int, micros_per_step: int, seed: int, epoch: int
) -> list[list[int]]:
    """A seeded shuffle, then steps of `per_step` indices sorted by length (longest first) inside
    mega-batches of about MEGABATCH_MICROS micro-batches, then the steps shuffled."""
    lengths = np.asarray(lengths, np.int64)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    mega = per_step * max(1, MEGABATCH_MICROS // micros_per_step)
    steps: list[list[int]] = []
    for lo in range(0, len(order), mega):
        chunk = order[lo : lo + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        steps.extend(chunk[s : s + per_step].tolist() for s in range(0, len(chunk), per_step))
    return [steps[i] for i in rng.permutation(len(steps))]


def split_by_tokens(
    indices: Sequence[int], lengths: np.ndarray, micro_batch_size: int, budget: int
) -> list[list[int]]:
    """Consecutive micro-batches of `indices` (longest first) with at most `micro_batch_size` sequences and
    rows x longest row <= `budget` padded tokens. A sequence longer than the budget is never cut: it forms a
    micro-batch of its own."""
    micros: list[list[int]] = []
    current: list[int] = []
    for i in sorted(indices, key=lambda j: -int(lengths[j])):
        width = int(lengths[current[0]]) if current else 0
        if current and (len(current) == micro_batch_size or (len(current) + 1) * width > budget):
            micros.append(current)
            current = []
        current.append(i)
    return [*micros, current] if current else micros


def steps_per_epoch(n_examples: int, micro_batch_size: int, accumulation: int) -> int:
    """Steps of a fixed-count plan; a token-budget plan of s sequences per step: steps_per_epoch(n, s, 1)."""
    return -(-n_examples // (micro_batch_size * accumulation))


@dataclass(frozen=True)
class PlanStats:
    """What a plan does with a token budget: sequences over it (each alone) and the largest other pass."""

    oversized_sequences: int = 0  # sequences longer than the budget, each trained in a pass of its own
    max_pass_tokens: int = 0  # most padded tokens (rows x longest row) of a pass without such a sequence


def plan_stats(plan: list[list[list[int]]], lengths: np.ndarray, budget: int | None) -> PlanStats:
    lengths = np.asarray(lengths, np.int64)
    over = 0 if budget is None else int(np.count_nonzero(lengths > budget))
    widest = 0
    for micros in plan:
        for m in micros:
            if m and (budget is None or int(lengths[m].max()) <= budget):
                widest = max(widest, len(m) * int(lengths[m].max()))
    return PlanStats(over, widest)


# ------------------------------------------------------------------------------------------ collation


@dataclass(frozen=True, eq=False)
class MicroBatch:
    """One forward pass, right-padded to its longest sequence.

    input_ids: (B, L) int64; lengths: (B,) int64 real tokens per row; flat_pos: (N,) int64 index of each
    supervised position in the flattened (B * L) hidden states; target_ids: (N,) int64; segment: (N,) int8;
    topk_ids: (N, k) int64; topk_logprobs: (N, k) float32; has_teacher: (N,) bool.
    weight: 1.0, or 0.0 for a dummy that only keeps the workers' collectives in step.
    Right padding needs no attention mask: causal attention never lets a real token see a later pad.
    """

    input_ids: np.ndarray
    lengths: np.ndarray
    flat_pos: np.ndarray
    target_ids: np.ndarray
    segment: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    has_teacher: np.ndarray
    kept_tokens: int
    weight: float = 1.0

    @property
    def n_targets(self) -> int:
        return 0 if self.weight == 0 else len(self.target_ids)

    @property
    def forward_tokens(self) -> int:
        return 0 if self.weight == 0 else int(self.lengths.sum())

    @property
    def sq_len_sum(self) -> int:
        """sum over rows of L * (L + 1): the causal attention term of the FLOPs formula."""
        return 0 if self.weight == 0 else int((self.lengths * (self.lengths + 1)).sum())


def collate(examples: Sequence[Example], k: int, pad_id: int = 0) -> MicroBatch:
    """Pad a micro-batch to its longest sequence; an empty list gives a one-token zero-weight dummy."""
    if not examples:
        return dummy_batch(k, pad_id)
    width = max(len(e) for e in examples)
    ids = np.full((len(examples), width), pad_id, np.int64)
    for b, e in enumerate(examples):
        ids[b, : len(e)] = e.input_ids
    flat = np.concatenate([b * width + e.target_pos.astype(np.int64) for b, e in enumerate(examples)])
    cat = lambda name, dtype: np.concatenate([getattr(e, name) for e in examples]).astype(dtype)  # noqa: E731
    return MicroBatch(
        input_ids=ids,
        lengths=np.array([len(e) for e in examples], np.int64),
        flat_pos=flat,
        target_ids=cat("target_ids", np.int64),
        segment=cat("segment", np.int8),
        topk_ids=cat("topk_ids", np.int64).reshape(len(flat), k),
        topk_logprobs=cat("topk_logprobs", np.float32).reshape(len(flat), k),
        has_teacher=cat("has_teacher", bool),
        kept_tokens=sum(e.kept_tokens for e in examples),
    )


def dummy_batch(k: int, pad_id: int = 0) -> MicroBatch:
    """One pad token predicting itself, weight 0: a forward and backward that changes nothing."""
    return MicroBatch(
        input_ids=np.full((1, 1), pad_id, np.int64),
        lengths=np.ones(1, np.int64),
        flat_pos=np.zeros(1, np.int64),
        target_ids=np.full(1, pad_id, np.int64),
        segment=np.zeros(1, np.int8),
        topk_ids=np.arange(k, dtype=np.int64)[None, :],
        topk_logprobs=np.full((1, k), -np.log(max(k, 1)), np.float32),
        has_teacher=np.full(1, k > 0),
        kept_tokens=0,
        weight=0.0,
    )


def example_lengths(examples: Collection[Example]) -> np.ndarray:
    return np.fromiter((len(e) for e in examples), np.int64, len(examples))
