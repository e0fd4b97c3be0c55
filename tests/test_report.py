"""The results table: retained % and savings against the right full-sequence run; failures visible."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from raykd.report import write_results
from raykd.report_rows import References, by_set, complete_rows
from raykd.report_seeds import aggregate_rows, retained


def record(f: float, seg: str, acc: float, seed: int = 0, status: str = "ok", **kw) -> dict:
    rec = {
        "trial_id": f"f{f:.2f}_{seg}_s{seed}",
        "fraction": f,
        "segments": seg,
        "seed": seed,
        "status": status,
        "accuracy": acc if status == "ok" else None,
        "stderr": 0.01,
        "kept_tokens": 1000 * f,
        "supervised_tokens": 800 * f,
        "flops": 1e12 * f,
        "train_s": 100 * f,
    }
    return rec | kw


def test_retained_uses_full_run_with_same_segments_and_seed() -> None:
    rows = complete_rows(
        [
            record(1.0, "CoT", 0.80),
            record(0.5, "CoT", 0.60),
            record(1.0, "P+CoT+A", 0.40),
            record(0.5, "P+CoT+A", 0.30),
            record(1.0, "CoT", 0.20, seed=1),
            record(0.5, "CoT", 0.10, seed=1),
        ]
    )
    by_id = {r["trial_id"]: r for r in rows}
    assert by_id["f0.50_CoT_s0"]["retained_pct"] == pytest.approx(75.0)
    assert by_id["f0.50_P+CoT+A_s0"]["retained_pct"] == pytest.approx(75.0)
    assert by_id["f0.50_CoT_s1"]["retained_pct"] == pytest.approx(50.0)
    assert by_id["f1.00_CoT_s0"]["retained_pct"] == pytest.approx(100.0)
    assert by_id["f0.50_CoT_s0"]["flops_saved_pct"] == pytest.approx(50.0)
    assert by_id["f0.50_CoT_s0"]["time_saved_pct"] == pytest.approx(50.0)


def test_no_baseline_or_failed_baseline_leaves_retained_empty() -> None:
    rows = complete_rows(
        [record(0.5, "CoT", 0.6), record(1.0, "A", 0.0, status="failed", error="OOM"), record(0.5, "A", 0.3)]
    )
    assert all(r["retained_pct"] is None for r in rows)
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and failed[0]["error"] == "OOM"


def test_write_results_files(tmp_path: Path) -> None:
    records = [record(f, s, a) for f, s, a in [(1.0, "CoT", 0.8), (0.5, "CoT", 0.7), (1.0, "A", 0.5)]]
    records.append(record(0.5, "A", 0.0, status="failed", error="worker died"))
    table = write_results(records, tmp_path, References(teacher_accuracy=0.97, student_base_accuracy=0.3))
    with open(tmp_path / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 4
    assert (tmp_path / "frontier.png").stat().st_size > 1000
    assert "0.700 ± 0.010" in table and "87.5" in table
    assert "f0.50_A_s0 failed: worker died" in table
    assert "teacher accuracy (reference): 0.970" in table
    assert (tmp_path / "results.md").read_text().strip() == table.strip()


SEED_ACCS = {(1.0, "CoT"): [0.80, 0.70, 0.75], (0.5, "CoT"): [0.60, 0.66, 0.51], (0.5, "A"): [0.2, 0.3, 0.1]}


def seeded_records() -> list[dict]:
    return [record(f, seg, acc, seed=s) for (f, seg), accs in SEED_ACCS.items() for s, acc in enumerate(accs)]


def test_aggregate_over_seeds_matches_an_independent_computation() -> None:
    import numpy as np

    aggs = {(a["fraction"], a["segments"]): a for a in aggregate_rows(seeded_records())}
    half, full = np.array(SEED_ACCS[(0.5, "CoT")]), np.array(SEED_ACCS[(1.0, "CoT")])
    agg = aggs[(0.5, "CoT")]
    assert (agg["n_seeds"], agg["seeds"], agg["n_failed"]) == (3, [0, 1, 2], 0)
    assert agg["accuracy_mean"] == pytest.approx(half.mean())
    assert agg["accuracy_std"] == pytest.approx(half.std(ddof=1))
    assert agg["accuracy_sem"] == pytest.approx(half.std(ddof=1) / np.sqrt(3))
    # Retained: the ratio of means, its relative errors added in quadrature ...
    ratio = 100 * half.mean() / full.mean()
    u, u1 = half.std(ddof=1) / np.sqrt(3), full.std(ddof=1) / np.sqrt(3)
    assert agg["retained_pct"] == pytest.approx(ratio)
    assert agg["retained_pct_err"] == pytest.approx(ratio * np.hypot(u / half.mean(), u1 / full.mean()))
    # ... and a Monte Carlo draw of both means agrees with the first-order propagation (errors are small).
    rng = np.random.default_rng(0)
    draws = 100 * rng.normal(half.mean(), u, 400_000) / rng.normal(full.mean(), u1, 400_000)
    assert agg["retained_pct_err"] == pytest.approx(draws.std(), rel=0.03)
    # The reference point is 100 % by definition; the A mask has no f = 1.0 point to compare with.
    assert (aggs[(1.0, "CoT")]["retained_pct"], aggs[(1.0, "CoT")]["retained_pct_err"]) == (100.0, 0.0)
    assert aggs[(0.5, "A")]["retained_pct"] is None and aggs[(0.5, "A")]["accuracy_mean"] == pytest.approx(
        0.2
    )
    assert agg["flops_saved_pct"] == pytest.approx(50.0) and agg["kept_tokens"] == pytest.approx(500.0)


def test_retained_error_is_finite_at_zero_accuracy_and_absent_without_a_reference() -> None:
    value, error = retained(0.0, 0.02, 0.5, 0.05)
    assert value == 0.0 and error == pytest.approx(100 * 0.02 / 0.5)  # only the numerator's error is left
    assert retained(0.3, 0.01, 0.0, 0.0) is None


def test_one_seed_uses_the_trial_stderr_and_failed_seeds_are_counted_apart() -> None:
    records = [record(1.0, "CoT", 0.8, stderr=0.04), record(0.5, "CoT", 0.6, stderr=0.05)]
    records.append(record(0.5, "CoT", 0.0, seed=1, status="failed", error="OOM"))
    aggs = {a["fraction"]: a for a in aggregate_rows(records)}
    half = aggs[0.5]
    assert (half["n_seeds"], half["n_failed"], half["accuracy_std"], half["accuracy_sem"]) == (
        1,
        1,
        None,
        0.05,
    )
    assert half["retained_pct"] == pytest.approx(75.0)
    assert half["retained_pct_err"] == pytest.approx(75.0 * math.hypot(0.05 / 0.6, 0.04 / 0.8))


def test_markdown_shows_aggregates_only_with_several_seeds(tmp_path: Path) -> None:
    table = write_results(seeded_records(), tmp_path)
    assert "mean over seeds" in table
    half = [line for line in table.splitlines() if line.startswith("| 0.50 | CoT | 3 |")]
    assert len(half) == 1
    ratio = 100 * statistics.fmean(SEED_ACCS[(0.5, "CoT")]) / statistics.fmean(SEED_ACCS[(1.0, "CoT")])
    assert f"{statistics.fmean(SEED_ACCS[(0.5, 'CoT')]):.3f} ± " in half[0] and f"{ratio:.1f} ± " in half[0]
    single = write_results([record(1.0, "CoT", 0.8), record(0.5, "CoT", 0.6)], tmp_path / "one")
    assert "mean over seeds" not in single


def test_results_json_holds_trials_aggregates_references_and_models(tmp_path: Path) -> None:
    records = seeded_records()
    records[0]["eval_counts"] = {"correct": 4, "wrong": 1}  # record fields beyond the table travel along
    refs = References(teacher_accuracy=0.9, student_base_accuracy=0.2)
    refs.models = {"teacher": "org/teacher@abc", "student": "org/student@def"}
    write_results(records, tmp_path, refs)
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["trials"]) == len(records) and len(data["aggregates"]) == len(SEED_ACCS)
    by_id = {t["trial_id"]: t for t in data["trials"]}
    assert by_id["f1.00_CoT_s0"]["eval_counts"] == {"correct": 4, "wrong": 1}
    assert by_id["f0.50_CoT_s1"]["retained_pct"] == pytest.approx(100 * 0.66 / 0.70)
    assert data["aggregates"] == json.loads(json.dumps(aggregate_rows(records)))
    assert data["references"] == {"teacher_accuracy": 0.9, "student_base_accuracy": 0.2}
    assert data["models"] == refs.models
    assert set(data["aggregate_columns"]) == set(data["aggregates"][0])


def test_aggregates_carry_mean_pass_at_k_and_truncated_share() -> None:
    records = [
        record(0.5, "CoT", 0.5, seed=0, pass_at_k={1: 0.5, 2: 0.7, 4: 0.8}, eval_truncated_share=0.1),
        record(
            0.5, "CoT", 0.6, seed=1, pass_at_k={"1": 0.6, "2": 0.9}, eval_truncated_share=0.3
        ),  # from JSON
        record(1.0, "CoT", 0.8, seed=0),
    ]
    aggs = {a["fraction"]: a for a in aggregate_rows(records)}
    assert aggs[0.5]["pass_at_k"] == {"1": pytest.approx(0.55), "2": pytest.approx(0.8)}  # k both sampled
    assert aggs[0.5]["truncated_share"] == pytest.approx(0.2)
    assert aggs[1.0]["pass_at_k"] == {} and aggs[1.0]["truncated_share"] is None


def with_sets(rec: dict, **accs: float) -> dict:
    """A trial record as raykd.trial writes it with evaluation sets: every set's result under 'sets'."""
    sets = {
        name: {"accuracy": acc, "stderr": 0.02, "pass_at_k": {}, "truncated_share": 0.0}
        for name, acc in accs.items()
    }
    return rec | {"sets": sets, "accuracy": next(iter(accs.values()))}


def test_rows_and_aggregates_per_evaluation_set(tmp_path: Path) -> None:
    records = [
        with_sets(record(1.0, "CoT", 0, seed=0), aime=0.40, math500=0.80),
        with_sets(record(1.0, "CoT", 0, seed=1), aime=0.20, math500=0.70),
        with_sets(record(0.5, "CoT", 0, seed=0), aime=0.30, math500=0.60),
        with_sets(record(0.5, "CoT", 0, seed=1), aime=0.10, math500=0.66),
        record(0.5, "A", 0.0, seed=0, status="failed", error="OOM"),
    ]
    rows = complete_rows(by_set(records))
    assert len(rows) == 4 * 2 + 2  # every trial once per set, the failed one too
    half = {(r["set"], r["seed"]): r for r in rows if r["fraction"] == 0.5 and r["segments"] == "CoT"}
    assert half[("aime", 0)]["retained_pct"] == pytest.approx(75.0)  # against its own set's f = 1.0
    assert half[("math500", 1)]["retained_pct"] == pytest.approx(100 * 0.66 / 0.70)
    aggs = {(a["fraction"], a["segments"], a["set"]): a for a in aggregate_rows(by_set(records))}
    aime = aggs[(0.5, "CoT", "aime")]
    assert aime["accuracy_mean"] == pytest.approx(0.2) and aime["retained_pct"] == pytest.approx(200 / 3)
    assert aggs[(0.5, "A", "aime")]["n_failed"] == 1 and aggs[(0.5, "A", "math500")]["n_seeds"] == 0
    table = write_results(records, tmp_path)
    assert "| seed | set | status |" in table and "| 0.50 | CoT | aime | 2 |" in table
    assert table.count("f0.50_A_s0 failed: OOM") == 1
    data = json.loads((tmp_path / "results.json").read_text())
    assert {(t["trial_id"], t["set"]) for t in data["trials"]} >= {("f0.50_CoT_s1", "math500")}
