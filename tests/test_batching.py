"""raykd.kd.batching: trace rows -> truncated, labelled examples -> length-grouped, padded micro-batches."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raykd.kd import batching
from raykd.kd.examples import Example, PrepStats, TrialData, prepare_examples, select_budget, sort_by_key
from raykd.kd.synthetic import EOS, THINK_CLOSE, THINK_OPEN, synthetic_rows
from raykd.segments import ANSWER, COT, PROMPT

K = 3


def _row(prompt: list[int], cot: list[int], answer: list[int], k: int = K, prompt_rows: bool = False) -> dict:
    """One trace; top-k row i of a token t holds ids (t*10, t*10+1, ...) so that rows can be traced back."""
    completion = [THINK_OPEN, *cot, THINK_CLOSE, *answer, EOS]
    ids = [t * 10 + j for t in completion for j in range(k)]
    p_ids = [t * 10 + j for t in prompt[1:] for j in range(k)] if prompt_rows else []
    labels = [PROMPT] * len(prompt) + [COT] * (len(cot) + 2) + [ANSWER] * (len(answer) + 1)
    return {
        "prompt_ids": prompt,
        "completion_ids": completion,
        "segments": labels,
        "k": k,
        "topk_ids": ids,
        "topk_logprobs": [-1.0] * len(ids),
        "prompt_topk_ids": p_ids,
        "prompt_topk_logprobs": [-1.0] * len(p_ids),
    }


def _rows(*rows: dict) -> dict[str, list]:
    cols = {name: [r[name] for r in rows] for name in rows[0]}
    cols["problem_id"] = [f"p{i}" for i in range(len(rows))]
    cols["sample_index"] = [0] * len(rows)
    return cols


def _prepare(rows: dict, **trial) -> tuple[list[Example], PrepStats]:
    return prepare_examples(rows, TrialData(**trial))


def test_lead_span_cot_mask_exact_example():
    # full sequence: P = [40, 41, 42], then <think> 50 51 52 53 </think> 60 EOS  -> L = 11
    rows = _rows(_row([40, 41, 42], [50, 51, 52, 53], [60]))
    (ex,), stats = _prepare(rows, fraction=0.6, segments=("cot",))  # keeps ceil(6.6) = 7 tokens
    kept = [40, 41, 42, THINK_OPEN, 50, 51, 52]
    # targets: the CoT tokens among the kept ones (positions 3..6), each predicted from the position before
    assert ex.target_ids.tolist() == kept[3:7]
    assert ex.target_pos.tolist() == [2, 3, 4, 5]
    # the last kept token is a target, never an input: inputs stop one short of it
    assert ex.input_ids.tolist() == kept[:6]
    assert ex.segment.tolist() == [COT] * 4
    # teacher row of completion token c is row c: ids c*10 + j of the token it describes
    assert ex.topk_ids[:, 0].tolist() == [t * 10 for t in kept[3:7]]
    assert ex.has_teacher.all()
    assert (ex.kept_tokens, ex.full_tokens) == (7, 11)
    assert stats.supervised_tokens == 4 and stats.kept_tokens == 7 and stats.forward_tokens == 6


def test_tokens_after_the_last_target_leave_the_forward_pass():
    rows = _rows(_row([40, 41], [50, 51, 52], [60, 61, 62]))
    (ex,), _ = _prepare(rows, fraction=1.0, segments=("cot",))
    # the CoT ends with </think> at index 6; the answer (60 61 62 EOS) is never run
    assert ex.input_ids.tolist() == [40, 41, THINK_OPEN, 50, 51, 52]
    assert ex.target_ids.tolist() == [THINK_OPEN, 50, 51, 52, THINK_CLOSE]
    assert ex.kept_tokens == 11


def test_prompt_targets_use_prompt_rows_or_are_marked_without_teacher():
    row = _row([40, 41, 42], [50], [60])
    (with_rows,), _ = _prepare(_rows({**row, **_row([40, 41, 42], [50], [60], prompt_rows=True)}))
    (without,), stats = _prepare(_rows(row))
    # the first prompt token is never a target; prompt token i is described by prompt row i - 1
    assert with_rows.target_ids.tolist()[:2] == [41, 42]
    assert with_rows.topk_ids[:2, 0].tolist() == [410, 420]
    assert with_rows.has_teacher.all()
    assert without.has_teacher.tolist() == [False, False] + [True] * (len(without.target_ids) - 2)
    assert stats.no_teacher_targets == 2


@pytest.mark.parametrize("prompt_logprobs", [False, True])
@pytest.mark.parametrize(
    "policy,fraction",
    [("lead_span", 0.3), ("window_middle", 0.5), ("window_right", 0.5), ("budget_matched", 0.5)],
)
def test_teacher_rows_describe_each_target(policy: str, fraction: float, prompt_logprobs: bool):
    # synthetic traces put the true next token first in every top-k row: an independent alignment check
    rows = synthetic_rows(12, vocab=64, k=4, seed=3, prompt_logprobs=prompt_logprobs)
    examples, _ = _prepare(rows, fraction=fraction, truncation_policy=policy)
    assert examples
    for ex in examples:
        with_teacher = ex.has_teacher
        assert (ex.topk_ids[with_teacher, 0] == ex.target_ids[with_teacher]).all()
        assert with_teacher.all() == prompt_logprobs or not (ex.segment == PROMPT).any()
        # the target at position p is the input token at p + 1 whenever that token is an input
        inside = ex.target_pos + 1 < len(ex.input_ids)
        assert (ex.input_ids[ex.target_pos[inside] + 1] == ex.target_ids[inside]).all()


def test_window_right_keeps_the_last_tokens():
    rows = _rows(_row([40, 41], [50, 51, 52, 53, 54, 55], [60]))  # L = 12
    (ex,), _ = _prepare(rows, fraction=0.5, truncation_policy="window_right")
    assert ex.kept_tokens == 6
    # kept: 53 54 55 </think> 60 EOS; the window's first token is never a target
    assert ex.target_ids.tolist() == [54, 55, THINK_CLOSE, 60, EOS]
    assert ex.input_ids.tolist() == [53, 54, 55, THINK_CLOSE, 60]


def test_examples_without_a_supervised_token_are_dropped_and_counted():
    rows = _rows(_row([40, 41], [50] * 20, [60]), _row([40], [50], [60]))
    examples, stats = _prepare(rows, fraction=0.25, segments=("answer",))
    # the long trace loses its answer; the short one (L = 6) keeps 2 tokens: no answer either
    assert examples == [] and stats.unsupervised_sequences == 2 and stats.kept_sequences == 0


def test_random_label_mask_drops_labels_not_compute_and_ignores_batching():
    rows = synthetic_rows(20, vocab=64, k=4, seed=1)
    full, _ = _prepare(rows, fraction=0.5)
    masked, stats = _prepare(rows, fraction=0.5, random_label_mask=0.5, seed=7)
    # same forward tokens, about half the targets
    assert [e.input_ids.tolist() for e in masked] == [e.input_ids.tolist() for e in full]
    total = sum(len(e.target_ids) for e in full)
    assert 0.35 * total < stats.supervised_tokens < 0.65 * total
    # each example's labels depend on its key and the seed, not on which rows share its batch
    halves = [{k: v[:7] for k, v in rows.items()}, {k: v[7:] for k, v in rows.items()}]
    split = [e for h in halves for e in _prepare(h, fraction=0.5, random_label_mask=0.5, seed=7)[0]]
    assert [e.target_ids.tolist() for e in split] == [e.target_ids.tolist() for e in masked]


def test_budget_matched_keeps_full_sequences_within_the_lead_span_budget():
    rows = synthetic_rows(30, vocab=64, k=2, seed=2)
    trial = TrialData(fraction=0.5, truncation_policy="budget_matched")
    examples, _ = prepare_examples(rows, trial)
    kept, dropped = select_budget(sort_by_key(examples), trial)
    budget = sum(math.ceil(0.5 * e.full_tokens) for e in examples)
    assert all(e.kept_tokens == e.full_tokens for e in kept)
    assert sum(e.full_tokens for e in kept) <= budget
    assert dropped == len(examples) - len(kept) > 0


def test_traces_without_topk_prepare_for_an_online_teacher():
    rows = synthetic_rows(4, vocab=64, k=4, seed=6)
    for name in ("k", "topk_ids", "topk_logprobs", "prompt_topk_ids", "prompt_topk_logprobs"):
        del rows[name]
    examples, _ = _prepare(rows, fraction=0.5)
    assert examples and all(
        e.topk_ids.shape == (len(e.target_ids), 0) and not e.has_teacher.any() for e in examples
    )
    mb = batching.collate(examples[:2], k=0)
    assert mb.topk_ids.shape == (mb.n_targets, 0)
    assert batching.collate([], k=0).topk_ids.shape == (1, 0)


def test_bad_rows_are_clear_errors():
    rows = _rows(_row([1, 2], [5], [6], k=2), _row([1, 2], [5], [6], k=3))
    with pytest.raises(ValueError, match="mix top-k widths"):
        _prepare(rows)
    short = _row([1, 2], [5], [6])
    short["topk_ids"] = short["topk_ids"][:-1]
    with pytest.raises(ValueError, match="len\\(completion_ids\\) \\* k"):
        _prepare(_rows(short))
    with pytest.raises(ValueError, match="truncation policy 'lead' is not one of"):
        _prepare(_rows(_row([1, 2], [5], [6])), truncation_policy="lead")


# ------------------------------------------------------------------------------------------ epoch plans


def test_plan_covers_every_example_once_with_full_accumulation():
    lengths = np.random.default_rng(0).integers(5, 500, size=37)
    plan = batching.plan_epoch(lengths, micro_batch_size=3, accumulation=2, seed=1, epoch=0)
    assert len(plan) == batching.steps_per_epoch(37, 3, 2) == 7
    assert all(len(step) == 2 and all(len(m) <= 3 for m in step) for step in plan)
    flat = sorted(i for step in plan for m in step for i in m)
    assert flat == list(range(37))
    assert plan == batching.plan_epoch(lengths, 3, 2, seed=1, epoch=0)
    assert plan != batching.plan_epoch(lengths, 3, 2, seed=1, epoch=1)


def test_length_grouping_pads_less_than_random_batches():
    lengths = np.random.default_rng(0).integers(10, 2000, size=512)

    def padding(micros: list[list[int]]) -> int:
        return sum(len(m) * max(lengths[m]) - sum(lengths[m]) for m in micros if m)

    grouped = [m for step in batching.plan_epoch(lengths, 4, 2, seed=0, epoch=0) for m in step]
    order = np.random.default_rng(1).permutation(512)
    random = [order[i : i + 4].tolist() for i in range(0, 512, 4)]
    assert padding(grouped) < 0.2 * padding(random)


def test_empty_shard_plans_no_steps():
    assert batching.plan_epoch([], 2, 2, seed=0, epoch=0) == []


# ------------------------------------------------------------------------------------------ collation


def test_collate_pads_dynamically_and_indexes_supervised_positions():
    rows = synthetic_rows(5, vocab=64, k=4, seed=4)
    examples, _ = _prepare(rows, fraction=0.5)
    mb = batching.collate(examples[:3], k=4, pad_id=0)
    width = max(len(e) for e in examples[:3])
    assert mb.input_ids.shape == (3, width)
    assert mb.lengths.tolist() == [len(e) for e in examples[:3]]
    assert mb.n_targets == sum(len(e.target_ids) for e in examples[:3]) == len(mb.flat_pos)
    rows_of, pos = np.divmod(mb.flat_pos, width)
    assert (pos < mb.lengths[rows_of]).all()  # never a padded position
    for b, e in enumerate(examples[:3]):
        assert (mb.input_ids[b, : len(e)] == e.input_ids).all() and (mb.input_ids[b, len(e) :] == 0).all()
    assert mb.topk_ids.shape == (mb.n_targets, 4)
    assert mb.forward_tokens == int(mb.lengths.sum())
    assert mb.sq_len_sum == sum(n * (n + 1) for n in mb.lengths.tolist())


def test_dummy_batch_weighs_nothing():
    mb = batching.collate([], k=4)
    assert mb.weight == 0 and mb.n_targets == 0 and mb.forward_tokens == 0 and mb.input_ids.shape == (1, 1)


# ------------------------------------------------------------------------------------------ token budget


def test_token_budget_plan_trains_long_sequences_alone_and_bounds_the_rest():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 120, size=53)
    lengths[[3, 17, 40]] = [300, 150, 501]  # longer than the budget
    budget = 128
    plan = batching.plan_epoch_tokens(
        lengths, 8, micro_batch_size=4, micro_batch_tokens=budget, seed=2, epoch=0
    )
    assert len(plan) == batching.steps_per_epoch(53, 8, 1) == 7
    # step_sequences per step (the last, in shuffled order somewhere, holds the 5 left)
    assert sorted(sum(len(m) for m in micros) for micros in plan) == [5] + [8] * 6
    flat = [i for micros in plan for m in micros for i in m]
    assert sorted(flat) == list(range(53))  # every sequence once, whole (indices, never parts)
    for micros in plan:
        for m in micros:
            assert 1 <= len(m) <= 4
            if lengths[m].max() > budget:
                assert len(m) == 1  # an oversized sequence trains alone
            else:
                assert len(m) * lengths[m].max() <= budget
    stats = batching.plan_stats(plan, lengths, budget)
    assert stats.oversized_sequences == 3 and 0 < stats.max_pass_tokens <= budget
    assert plan == batching.plan_epoch_tokens(lengths, 8, 4, budget, seed=2, epoch=0)


def test_split_by_tokens_packs_longest_first():
    lengths = np.array([50, 10, 200, 30, 30, 40])
    micros = batching.split_by_tokens(range(6), lengths, micro_batch_size=3, budget=100)
    assert micros == [[2], [0, 5], [3, 4, 1]]  # 200 alone; 2 x 50; 3 x 30


def test_collated_token_budget_passes_keep_every_token():
    rows = synthetic_rows(12, vocab=64, k=K, cot_len=(5, 90), seed=4)
    examples, _ = _prepare(rows, fraction=1.0)
    lengths = batching.example_lengths(examples)
    budget = int(np.median(lengths))
    plan = batching.plan_epoch_tokens(lengths, 6, 6, budget, seed=0, epoch=0)
    batches = [batching.collate([examples[i] for i in m], K) for micros in plan for m in micros]
    assert sum(mb.forward_tokens for mb in batches) == int(lengths.sum())  # nothing cut
    assert sum(mb.n_targets for mb in batches) == sum(len(e.target_ids) for e in examples)
    for mb in batches:
        assert mb.input_ids.size <= budget or len(mb.lengths) == 1
