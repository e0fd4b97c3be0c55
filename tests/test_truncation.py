"""Truncation policies, loss masks and metadata: exact values, edge cases, and properties on random batches
checked against a plain per-example list reference."""

from __future__ import annotations

import math
from fractions import Fraction
from itertools import combinations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raykd.segments import ANSWER, COT, PROMPT, SEGMENTS, Ragged, Segmentation
from raykd.truncation import (
    POLICIES,
    Windows,
    budget_matched,
    example_meta,
    kept_labels,
    kept_lengths,
    loss_mask,
    make_windows,
    random_label_mask,
    take_windows,
    truncate_batch,
    window,
)

SUBSETS = [set(c) for r in (1, 2, 3) for c in combinations(SEGMENTS, r)]


def make_seg(rows: list[tuple[int, int, int, int]]) -> Segmentation:
    """rows: (prompt_end, close_start or -1, answer_start, length)."""
    arr = np.array(rows, np.int64).reshape(-1, 4)
    offsets = np.concatenate([[0], np.cumsum(arr[:, 3])]).astype(np.int64)
    return Segmentation(offsets, arr[:, 0], arr[:, 1], arr[:, 2], np.zeros(len(arr), np.uint16))


# Four traces of length 10: normal (P 2, CoT 6 with `</think>` at 6-7, A 2), no close tag (CoT to the end),
# no think tags (all answer after the prompt), answer only one token.
SEG = make_seg([(2, 6, 8, 10), (2, -1, 10, 10), (3, -1, 3, 10), (1, 7, 9, 10)])
IDS = Ragged(np.arange(100, 140, dtype=np.int32), SEG.offsets)


def test_kept_lengths_round_up_exactly() -> None:
    lengths = np.array([10, 10, 7, 1, 3, 4096, 0])
    assert kept_lengths(lengths[:1], 0.3).tolist() == [3]  # 0.3 * 10 is 3.0000000000000004 in floats
    assert kept_lengths(lengths, 0.5).tolist() == [5, 5, 4, 1, 2, 2048, 1]
    assert kept_lengths(lengths, 0.01).tolist() == [1, 1, 1, 1, 1, 41, 1]
    assert kept_lengths(lengths, 1.0).tolist() == [10, 10, 7, 1, 3, 4096, 1]
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"is not in \(0, 1\]"):
            kept_lengths(lengths, bad)


def test_windows_left_middle_right() -> None:
    lengths = np.array([10, 7, 1, 0])
    assert window(lengths, 0.5, "left").starts.tolist() == [0, 0, 0, 0]
    assert window(lengths, 0.5, "left").ends.tolist() == [5, 4, 1, 0]
    assert list(zip(*(a.tolist() for a in vars(window(lengths, 0.5, "middle")).values()), strict=True)) == [
        (2, 7), (1, 5), (0, 1), (0, 0)]  # fmt: skip
    right = window(lengths, 0.5, "right")
    assert (right.starts.tolist(), right.ends.tolist()) == ([5, 3, 0, 0], [10, 7, 1, 0])
    with pytest.raises(ValueError, match="window position"):
        window(lengths, 0.5, "centre")


def test_policies_exact_on_the_four_traces() -> None:
    assert make_windows("lead_span", SEG, 0.3).ends.tolist() == [3, 3, 3, 3]
    cut = make_windows("cut_after_think", SEG)
    assert (cut.starts.tolist(), cut.ends.tolist()) == ([0, 0, 0, 0], [8, 10, 3, 9])
    assert make_windows("budget_matched", SEG).ends.tolist() == [10, 10, 10, 10]
    with pytest.raises(ValueError, match="truncation policy"):
        make_windows("tail", SEG, 0.5)


def test_cut_after_think_keeps_at_least_one_token() -> None:
    seg = make_seg([(0, -1, 0, 4)])  # no prompt, no tags: all answer
    assert make_windows("cut_after_think", seg).ends.tolist() == [1]


def test_truncate_lead_half_supervise_cot_exact() -> None:
    batch = truncate_batch(IDS, SEG, make_windows("lead_span", SEG, 0.5), ["cot"])
    assert batch.ids.tolist() == [[100, 101, 102, 103, 104], [110, 111, 112, 113, 114],
                                  [120, 121, 122, 123, 124], [130, 131, 132, 133, 134]]  # fmt: skip
    assert batch.labels.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 2, 2], [0, 1, 1, 1, 1]]
    assert Ragged(batch.mask, batch.ids.offsets).tolist() == [
        [False, False, True, True, True], [False, False, True, True, True],
        [False] * 5, [False, True, True, True, True]]  # fmt: skip
    meta = batch.meta
    assert meta.kept.tolist() == [5, 5, 5, 5]
    assert meta.kept_per_segment.tolist() == [[2, 3, 0], [2, 3, 0], [3, 0, 2], [1, 4, 0]]
    assert meta.supervised_per_segment.tolist() == [[0, 3, 0], [0, 3, 0], [0, 0, 0], [0, 4, 0]]
    assert meta.close_tag_kept.tolist() == [False, False, False, False]
    assert meta.answer_kept.tolist() == [False, False, False, False]
    counts = meta.counts()
    assert counts["no_supervised_tokens"] == 1 and counts["supervised_tokens"] == 10
    assert counts["kept_tokens"] == 20 and counts["supervised_cot"] == 10


def test_right_window_and_metadata_flags() -> None:
    batch = truncate_batch(IDS, SEG, make_windows("window_right", SEG, 0.5), ["prompt", "cot", "answer"])
    assert batch.ids.tolist()[0] == [105, 106, 107, 108, 109]
    assert batch.labels.tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 1], [2] * 5, [1, 1, 1, 1, 2]]
    assert batch.meta.close_tag_kept.tolist() == [True, False, False, True]
    assert batch.meta.answer_kept.tolist() == [True, False, False, True]  # #2: answer starts at 3, cut
    # the first kept token has no prediction, whatever its segment
    assert batch.meta.supervised_per_segment.tolist() == [[0, 2, 2], [0, 4, 0], [0, 0, 4], [0, 3, 1]]


@pytest.mark.parametrize("segments", SUBSETS, ids=lambda s: "+".join(sorted(s)))
def test_every_segment_subset_after_a_cut(segments: set[str]) -> None:
    """A segment the cut removed is empty, never an error; labels only on the chosen segments."""
    batch = truncate_batch(IDS, SEG, make_windows("cut_after_think", SEG), segments)
    chosen = {SEGMENTS[s] for s in segments}
    for labels, mask in zip(batch.labels.tolist(), Ragged(batch.mask, batch.labels.offsets).tolist(),
                            strict=True):  # fmt: skip
        assert mask == [j > 0 and label in chosen for j, label in enumerate(labels)]
    assert batch.meta.kept_per_segment[:, ANSWER].tolist() == [0, 0, 0, 0]
    if segments == {"answer"}:
        assert batch.meta.counts()["no_supervised_tokens"] == 4


def test_loss_mask_rejects_bad_segments() -> None:
    labels = kept_labels(SEG, make_windows("budget_matched", SEG))
    for bad in ([], ["cot", "reasoning"]):
        with pytest.raises(ValueError, match="non-empty subset"):
            loss_mask(labels, bad)


def test_take_windows_on_per_token_rows_of_any_shape() -> None:
    topk = np.arange(40 * 3).reshape(40, 3)  # e.g. the teacher's top-3 logprobs per token
    kept = take_windows(topk, SEG.offsets, make_windows("window_middle", SEG, 0.2))
    assert kept.values.tolist() == [[12, 13, 14], [15, 16, 17], [42, 43, 44], [45, 46, 47],
                                    [72, 73, 74], [75, 76, 77], [102, 103, 104], [105, 106, 107]]  # fmt: skip
    assert kept.offsets.tolist() == [0, 2, 4, 6, 8]


def test_random_label_mask_is_a_seeded_subset() -> None:
    mask = np.ones(100_000, bool)
    mask[::3] = False
    dropped = random_label_mask(mask, 0.25, seed=1)
    assert not (dropped & ~mask).any()
    assert abs(dropped.sum() / mask.sum() - 0.75) < 0.01
    assert np.array_equal(dropped, random_label_mask(mask, 0.25, seed=1))
    assert not np.array_equal(dropped, random_label_mask(mask, 0.25, seed=2))
    assert np.array_equal(random_label_mask(mask, 0.0, seed=1), mask)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="drop ratio"):
            random_label_mask(mask, bad, seed=0)


def test_random_masking_saves_no_compute_and_is_counted() -> None:
    full = truncate_batch(IDS, SEG, make_windows("budget_matched", SEG), ["cot", "answer"])
    masked = truncate_batch(
        IDS, SEG, make_windows("budget_matched", SEG), ["cot", "answer"], drop_ratio=0.5, seed=3
    )
    assert masked.ids.tolist() == full.ids.tolist()
    assert not (masked.mask & ~full.mask).any()
    assert masked.meta.supervised.sum() == masked.mask.sum() < full.mask.sum()


def test_budget_matched_selection() -> None:
    lengths = np.array([10, 20, 30, 40])  # lead-span budget at 0.5: 5 + 10 + 15 + 20 = 50
    chosen = budget_matched(lengths, 0.5, seed=0)
    order = np.random.default_rng(0).permutation(4)
    assert chosen.tolist() == order[: len(chosen)].tolist()  # a prefix of the seeded order
    total = int(lengths[chosen].sum())
    assert total <= 50 and (len(chosen) == 4 or total + lengths[order[len(chosen)]] > 50)
    assert budget_matched(lengths, 0.5, seed=0).tolist() == chosen.tolist()
    assert budget_matched(lengths, 1.0, seed=5).tolist() == np.random.default_rng(5).permutation(4).tolist()
    assert budget_matched(np.array([10]), 0.5, seed=0).tolist() == []  # nothing fits: none, not a partial
    assert budget_matched(np.array([], np.int64), 0.5, seed=0).tolist() == []


# ---- properties on random batches ------------------------------------------------------------------------


@st.composite
def segmentations(draw: st.DrawFn) -> Segmentation:
    rows = []
    for _ in range(draw(st.integers(1, 8))):
        length = draw(st.integers(0, 40))
        prompt_end = draw(st.integers(0, length))
        answer = draw(st.integers(prompt_end, length))
        close = (
            draw(st.one_of(st.just(-1), st.integers(prompt_end, answer - 1))) if answer > prompt_end else -1
        )
        rows.append((prompt_end, close, answer, length))
    return make_seg(rows)


def expected_keep(policy: str, fraction: Fraction, seg: Segmentation, i: int) -> int:
    length = int(seg.lengths[i])
    if policy == "cut_after_think":
        return min(max(int(seg.answer_starts[i]), 1), length)
    if policy == "budget_matched":
        return length
    return min(max(1, math.ceil(fraction * length)), length)


@settings(max_examples=200, deadline=None)
@given(segmentations(), st.integers(1, 1000), st.integers(1, 1000), st.sampled_from(POLICIES),
       st.sampled_from(SUBSETS), st.sampled_from([0.0, 0.5]))  # fmt: skip
def test_truncation_properties(seg, num, den, policy, segments, drop_ratio) -> None:
    fraction = Fraction(min(num, den), den)
    windows = make_windows(policy, seg, float(fraction))
    positions = Ragged(
        np.arange(int(seg.offsets[-1])) - np.repeat(seg.offsets[:-1], seg.lengths), seg.offsets
    )
    batch = truncate_batch(positions, seg, windows, segments, drop_ratio=drop_ratio, seed=7)
    full_labels = Ragged(seg.labels(), seg.offsets).tolist()
    kept_pos, labels = batch.ids.tolist(), batch.labels.tolist()
    masks = Ragged(batch.mask, batch.ids.offsets).tolist()
    chosen = {SEGMENTS[s] for s in segments}
    for i, row_labels in enumerate(full_labels):
        keep = expected_keep(policy, fraction, seg, i)
        assert len(kept_pos[i]) == keep == windows.lengths[i]  # kept length is the policy's formula
        start = int(windows.starts[i])
        assert kept_pos[i] == list(range(start, start + keep))  # a contiguous window, tokens removed
        assert labels[i] == row_labels[start : start + keep]  # labels of the kept tokens
        assert labels[i] == sorted(labels[i])  # P, CoT, A in order
        for j, (m, label) in enumerate(zip(masks[i], labels[i], strict=True)):
            assert m <= (j > 0 and label in chosen)  # supervised positions are kept, labelled, predicted
            assert m == (j > 0 and label in chosen) or drop_ratio > 0
        sup = [sum(m and label == s for m, label in zip(masks[i], labels[i], strict=True))
               for s in (PROMPT, COT, ANSWER)]  # fmt: skip
        assert batch.meta.supervised_per_segment[i].tolist() == sup
        assert batch.meta.kept_per_segment[i].tolist() == [labels[i].count(s) for s in (PROMPT, COT, ANSWER)]
        close = int(seg.close_starts[i])
        assert batch.meta.close_tag_kept[i] == (
            close >= 0 and start <= close < seg.answer_starts[i] <= start + keep
        )
        answer = int(seg.answer_starts[i])
        assert batch.meta.answer_kept[i] == (
            answer < seg.lengths[i] and start <= answer and start + keep == seg.lengths[i]
        )
    assert batch.meta.counts()["no_supervised_tokens"] == sum(not any(m) for m in masks)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5000), max_size=50), st.integers(1, 100), st.integers(0, 2**32 - 1))
def test_budget_matched_properties(lengths, percent, seed) -> None:
    lengths = np.array(lengths, np.int64)
    chosen = budget_matched(lengths, percent / 100, seed)
    budget = sum(max(1, math.ceil(Fraction(percent, 100) * int(n))) for n in lengths)
    order = np.random.default_rng(seed).permutation(len(lengths))
    assert chosen.tolist() == order[: len(chosen)].tolist()
    assert lengths[chosen].sum() <= budget
    assert len(chosen) == len(lengths) or lengths[chosen].sum() + lengths[order[len(chosen)]] > budget


def test_example_meta_with_an_explicit_mask() -> None:
    windows = Windows(np.array([1, 0, 0, 0]), np.array([9, 10, 3, 10]))
    labels = kept_labels(SEG, windows)
    mask = np.ones(len(labels.values), bool)
    meta = example_meta(SEG, windows, Ragged(mask, labels.offsets))
    assert meta.supervised_per_segment.tolist() == [[1, 6, 1], [2, 8, 0], [3, 0, 0], [1, 8, 1]]
    assert meta.close_tag_kept.tolist() == [True, False, False, True]
