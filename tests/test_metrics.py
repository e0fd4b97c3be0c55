"""Evaluation metrics against independent counts: pass@k by enumerating every draw of k samples and by exact
binomials, pass@1 and its stderr by hand, and a recount from stored completions (tests/fixtures)."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from raykd.metrics import (
    k_values,
    pass_at_1,
    pass_at_k,
    pass_at_k_one,
    pass_at_ks,
    truncated_share,
)

FIXTURES = Path(__file__).parent / "fixtures"


def drawn_pass_at_k(n: int, c: int, k: int) -> float:
    """The definition: the share of all k-subsets of the n samples that hold a correct one."""
    samples = [True] * c + [False] * (n - c)
    draws = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in draw) for draw in draws) / len(draws)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_equals_the_share_of_draws_with_a_correct_sample(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k_one(n, c, k) == pytest.approx(drawn_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_is_stable_where_the_binomials_overflow_floats() -> None:
    n, c, k = 400, 7, 150  # C(400, 150) ~ 1e113: the quotient of floats would lose everything
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k_one(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k_one(n, 0, k) == 0.0 and pass_at_k_one(n, n - k + 1, k) == 1.0
    assert pass_at_k_one(n, 1, 1) == pytest.approx(1 / n)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k_one(4, 1, 5)


def test_pass_at_1_and_k_over_problems() -> None:
    correct = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0]])
    one = pass_at_1(correct)
    per_problem = [0.25, 1.0, 0.0, 0.5]
    assert one.mean == pytest.approx(statistics.fmean(per_problem))
    assert one.stderr == pytest.approx(statistics.stdev(per_problem) / 2)
    assert pass_at_k(correct, 1).mean == pytest.approx(one.mean)  # pass@1 is the share of correct samples
    two = [drawn_pass_at_k(4, c, 2) for c in (1, 4, 0, 2)]
    assert pass_at_k(correct, 2).mean == pytest.approx(statistics.fmean(two))
    assert pass_at_k(correct, 2).stderr == pytest.approx(statistics.stdev(two) / 2)
    assert pass_at_k(correct, 4).mean == pytest.approx(0.75)  # 3 of 4 problems solved at least once
    assert set(pass_at_ks(correct)) == {1, 2, 4}
    assert pass_at_ks(correct[:, :1]) == {}  # one sample: nothing beyond the accuracy
    assert pass_at_1(correct[:1]).stderr == 0.0


def test_k_values() -> None:
    assert k_values(1) == [1]
    assert k_values(4) == [1, 2, 4]
    assert k_values(6) == [1, 2, 4, 6]
    assert k_values(32) == [1, 2, 4, 8, 16, 32]


def test_truncated_share() -> None:
    assert truncated_share(["stop", "length", "stop", "length"]) == 0.5
    assert truncated_share([]) == 0.0


def stored_completions() -> list[dict]:
    lines = (FIXTURES / "eval_completions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_evaluator_summary_matches_a_recount_of_stored_completions() -> None:
    """The stored completions are checked with the project's answer check, summarised by the evaluator's
    `summarize`, and recounted here by hand from the same verdicts."""
    from raykd.evaluate import status_of, summarize

    problems = stored_completions()
    n = len(problems[0]["completions"])
    statuses = [
        status_of(c["text"], p["answer"], c["finish_reason"], p["check"])
        for p in problems
        for c in p["completions"]
    ]
    outputs = [{"completion_ids": [0] * c["tokens"]} | c for p in problems for c in p["completions"]]
    correct = np.array([s == "correct" for s in statuses], np.float64).reshape(len(problems), n)
    result = summarize(correct, statuses, outputs, 0.0)
    # By hand, from the fixture's own expected verdicts (written when the fixture was made).
    expected = [[c["expected"] == "correct" for c in p["completions"]] for p in problems]
    assert statuses == [c["expected"] for p in problems for c in p["completions"]]
    per_problem = [sum(row) / n for row in expected]
    assert result.accuracy == pytest.approx(statistics.fmean(per_problem))
    assert result.stderr == pytest.approx(statistics.stdev(per_problem) / math.sqrt(len(problems)))
    for k in (2, n):
        by_hand = statistics.fmean(drawn_pass_at_k(n, sum(row), k) for row in expected)
        assert result.pass_at_k[k] == pytest.approx(by_hand)
    lengths = [c["finish_reason"] == "length" for p in problems for c in p["completions"]]
    assert result.truncated_share == pytest.approx(sum(lengths) / len(lengths))
    assert result.counts["truncated"] == sum(lengths)
