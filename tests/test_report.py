"""The results table: retained % and savings against the right full-sequence run; failures visible."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from raykd.report import References, complete_rows, write_results


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
