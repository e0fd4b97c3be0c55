"""Means over seeds: one row per (fraction, segments, set) with its spread across seeds and the retained %
of the full-sequence mean with its propagated error.

Pure Python (math, statistics), on the rows of raykd.report_rows.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from raykd.report_rows import saved_pct, set_order
from raykd.trial import OK

AGGREGATE_COLUMNS = [
    "fraction",
    "segments",
    "set",
    "n_seeds",
    "seeds",
    "accuracy_mean",
    "accuracy_std",
    "accuracy_sem",
    "retained_pct",
    "retained_pct_err",
    "kept_tokens",
    "flops",
    "train_s",
    "tokens_saved_pct",
    "flops_saved_pct",
    "time_saved_pct",
    "n_failed",
    # means over seeds of the evaluator's pass@k ({k: value}, k as text; none with one sample per problem)
    # and of the share of eval samples cut at max tokens
    "pass_at_k",
    "truncated_share",
]


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def _mean_by_key(values: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the mean over the dicts that all hold it (pass@k of trials that sampled alike)."""
    shared = set.intersection(*(set(v) for v in values)) if values else set()
    return {str(k): statistics.fmean(v[k] for v in values) for k in sorted(shared, key=int)}


def _seed_stats(trials: list[dict[str, Any]]) -> tuple[float, float | None, float]:
    """(mean, std across seeds, standard error of the mean) of the trials' accuracies.

    With one seed there is no spread across seeds; the standard error is then the trial's own (across
    problems), the only uncertainty known.
    """
    accs = [t["accuracy"] for t in trials]
    mean = statistics.fmean(accs)
    if len(accs) == 1:
        return mean, None, trials[0].get("stderr") or 0.0
    std = statistics.stdev(accs)
    return mean, std, std / math.sqrt(len(accs))


def retained(mean: float, sem: float, full_mean: float, full_sem: float) -> tuple[float, float] | None:
    """Retained % R = 100·m/m₁ of the full-sequence mean m₁, and its standard error.

    First-order propagation (the delta method) of the two standard errors u (of m) and u₁ (of m₁), taken
    as independent:

        u_R = 100 · sqrt( u² / m₁²  +  m² · u₁² / m₁⁴ )      ( = R · sqrt((u/m)² + (u₁/m₁)²) when m > 0 )

    The first form stays finite when m = 0. The trials of both points share the eval problems and seeds;
    a positive correlation between m and m₁ would shrink the true error, so treating them as independent
    errs on the wide side. None when m₁ = 0 (no ratio).
    """
    if not full_mean:
        return None
    value = 100.0 * mean / full_mean
    error = 100.0 * math.sqrt(sem**2 / full_mean**2 + mean**2 * full_sem**2 / full_mean**4)
    return value, error


def aggregate_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (fraction, segments, set): accuracy mean, std across seeds (sample std, n - 1),
    standard error of the mean (std / √n), retained % of the f = 1.0 aggregate of the same segments and
    set with its error (`retained`), and the means of tokens, FLOPs and training time with their savings
    against that aggregate. Only trials whose status is 'ok' count; n_failed counts the others.

    The eval problems are the same for every seed, so the spread is over training seeds and sampling,
    not over a fresh draw of problems.
    """
    groups: dict[tuple[float, str, str | None], list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault((rec["fraction"], rec["segments"], rec.get("set")), []).append(rec)
    stats = {}
    for key, group in groups.items():
        ok = [r for r in group if r.get("status") == OK and r.get("accuracy") is not None]
        stats[key] = (ok, len(group) - len(ok), _seed_stats(ok) if ok else None)
    full = {(seg, name): st for (f, seg, name), st in stats.items() if math.isclose(f, 1.0) and st[2]}
    order = sorted(groups, key=lambda k: (set_order(k[2]), k[1], k[0]))
    return [_aggregate(key, *stats[key], full.get((key[1], key[2]))) for key in order]


def _aggregate(
    key: tuple[float, str, str | None],
    ok: list[dict[str, Any]],
    n_failed: int,
    seed_stats: tuple[float, float | None, float] | None,
    full: tuple[list[dict[str, Any]], int, tuple[float, float | None, float]] | None,
) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(AGGREGATE_COLUMNS)
    row |= {"fraction": key[0], "segments": key[1], "set": key[2], "n_seeds": len(ok), "n_failed": n_failed}
    row["seeds"] = sorted(r["seed"] for r in ok)
    if seed_stats is None:
        return row
    mean, std, sem = seed_stats
    row |= {"accuracy_mean": mean, "accuracy_std": std, "accuracy_sem": sem}
    for col in ("kept_tokens", "flops", "train_s"):
        row[col] = _mean([r.get(col) for r in ok])
    row["pass_at_k"] = _mean_by_key([{str(k): v for k, v in (r.get("pass_at_k") or {}).items()} for r in ok])
    row["truncated_share"] = _mean([r.get("eval_truncated_share") for r in ok])
    if full is None:
        return row
    full_ok, _, (full_mean, _, full_sem) = full
    if math.isclose(key[0], 1.0):  # the reference itself: 100 % by definition, no uncertainty
        ratio = (100.0, 0.0) if full_mean else None
    else:
        ratio = retained(mean, sem, full_mean, full_sem)
    row["retained_pct"], row["retained_pct_err"] = ratio or (None, None)
    for col, saved in (("kept_tokens", "tokens"), ("flops", "flops"), ("train_s", "time")):
        row[f"{saved}_saved_pct"] = saved_pct(row[col], _mean([r.get(col) for r in full_ok]))
    return row
