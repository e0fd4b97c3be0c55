"""Evaluation metrics on a (problems, samples) grid of correct/wrong: pass@1 with its standard error, the
unbiased pass@k estimator, and the share of completions cut at max tokens.

Pure Python and numpy, no Ray or vLLM: the evaluator (raykd.evaluate) calls these on what it counted, and a
test can recount them from stored completions.

pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): with n samples of a problem of
which c are correct, the chance that k of them drawn without replacement hold at least one correct one is
1 - C(n - c, k) / C(n, k). The binomials overflow floats for long runs (C(200, 100) ~ 1e58), so it is
computed as the product 1 - prod_{i = n - c + 1}^{n} (1 - k / i), one factor per correct sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A mean over problems and its standard error (sample std / sqrt(problems); 0 with one problem)."""

    mean: float
    stderr: float


def mean_and_stderr(per_problem: np.ndarray) -> Estimate:
    """per_problem: (problems,) values -> their mean and its standard error across problems."""
    n = len(per_problem)
    if n == 0:
        raise ValueError("no problems to average over")
    stderr = float(per_problem.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return Estimate(float(per_problem.mean()), stderr)


def pass_at_1(correct: np.ndarray) -> Estimate:
    """correct: (problems, samples) 0/1 -> the share of correct samples per problem, averaged over problems,
    with its standard error across problems."""
    return mean_and_stderr(np.asarray(correct, np.float64).mean(axis=1))


def pass_at_k_one(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples, ``c`` of them correct (1 <= k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k(correct: np.ndarray, k: int) -> Estimate:
    """correct: (problems, samples) 0/1 -> pass@k per problem, averaged over problems, with its stderr."""
    correct = np.asarray(correct)
    n = correct.shape[1]
    counts = correct.sum(axis=1).astype(int)
    return mean_and_stderr(np.array([pass_at_k_one(n, int(c), k) for c in counts], np.float64))


def k_values(samples: int) -> list[int]:
    """The k to report for ``samples`` per problem: 1, 2, 4, ... up to samples, and samples itself."""
    ks = [2**i for i in range(samples.bit_length()) if 2**i <= samples]
    return ks if ks[-1] == samples else [*ks, samples]


def pass_at_ks(correct: np.ndarray) -> dict[int, Estimate]:
    """pass@k for every k of `k_values` (empty with one sample per problem: pass@1 is the accuracy)."""
    samples = np.asarray(correct).shape[1]
    return {} if samples < 2 else {k: pass_at_k(correct, k) for k in k_values(samples)}


def truncated_share(finish_reasons: Iterable[str]) -> float:
    """The share of completions that stopped at max tokens (vLLM's finish_reason 'length')."""
    reasons: Sequence[str] = list(finish_reasons)
    return sum(r == "length" for r in reasons) / len(reasons) if reasons else 0.0
