"""Trial identity: exact trial ids, settings fingerprints in records and results.csv, and a rerun with changed
settings that runs the changed trials again (naming the keys) and never shows an old row as current.
Fast: no Ray (the records are written as a finished trial writes them)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from raykd.grid import Trial, duplicate_trial_ids, fraction_label, grid_trials
from raykd.identity import changed_keys, fingerprint, plan_resume, run_identity, trial_settings
from raykd.plan import make_plan
from raykd.problems.tasks import Problem
from raykd.report import write_results
from raykd.spec import SpecError, SweepAxes, SweepSpec, parse_spec
from raykd.trial import mark_started, read_record, trial_dir, write_record


def spec(**training: object) -> SweepSpec:
    return parse_spec(
        {
            "name": "t",
            "teacher": {"model": "embedded"},
            "student": {"model": "embedded"},
            "training": {"lr": 3e-4, **training},
            "sweep": {"truncation": [0.5, 1.0], "segments": [["cot"]]},
            "output": {"dir": "unused"},
        }
    )


@dataclass(frozen=True)
class FakeModels:
    """The model folders of raykd.run.Models (only what identity reads)."""

    tokenizer_dir: str
    teacher_dir: str
    student_dir: str


@pytest.fixture
def models(tmp_path: Path) -> FakeModels:
    for name in ("teacher", "student"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_text(name)
    return FakeModels(str(tmp_path / "teacher"), str(tmp_path / "teacher"), str(tmp_path / "student"))


EVAL = [Problem(id="e0", prompt="1 ; 1 2", answer="2")]


def finish(out: Path, s: SweepSpec, trial: Trial, shared: dict[str, str], accuracy: float = 0.5) -> None:
    """What a finished trial leaves: its record, carrying the identity it ran with."""
    settings = trial_settings(s, trial, shared)
    record = {
        "trial_id": trial.trial_id,
        "fraction": trial.fraction,
        "segments": trial.segments_label,
        "seed": trial.seed,
        "status": "ok",
        "accuracy": accuracy,
        "fingerprint": fingerprint(settings),
        "settings": settings,
    }
    write_record(str(out), trial.trial_id, record)


def test_trial_ids_are_exact_and_distinct() -> None:
    assert [fraction_label(f) for f in (0.5, 1.0, 0.12, 0.125, 0.1)] == [
        "0.50",
        "1.00",
        "0.12",
        "0.125",
        "0.10",
    ]
    axes = SweepAxes(truncation=[0.12, 0.125], segments=[["cot"]])
    assert [t.trial_id for t in grid_trials(axes)] == ["f0.12_CoT_s0", "f0.125_CoT_s0"]
    clash = [Trial(0.5, ("cot",), 0), Trial(0.5, ("cot",), 0)]
    assert list(duplicate_trial_ids(clash)) == ["f0.50_CoT_s0"]
    with pytest.raises(SpecError, match=r"sweep.truncation: 0.5 is listed twice"):
        parse_spec({**spec().model_dump(), "sweep": {"truncation": [0.5, 0.5], "segments": [["cot"]]}})


def test_fingerprint_follows_what_changes_a_result(models: FakeModels) -> None:
    shared = run_identity(models, "traceskey", EVAL)
    trial = make_plan(spec()).trials[0]
    base = trial_settings(spec(), trial, shared)
    assert fingerprint(base) == fingerprint(trial_settings(spec(), trial, shared))
    lr = trial_settings(spec(lr=1e-3), trial, shared)
    assert fingerprint(lr) != fingerprint(base)
    assert changed_keys(base, lr) == ["training.lr: 0.0003 -> 0.001"]
    other_traces = trial_settings(spec(), trial, run_identity(models, "otherkey", EVAL))
    assert changed_keys(base, other_traces) == ["traces.key: traceskey -> otherkey"]
    Path(models.student_dir, "model.safetensors").write_text("retrained in place")
    moved = trial_settings(spec(), trial, run_identity(models, "traceskey", EVAL))
    assert [k.split(":")[0] for k in changed_keys(base, moved)] == ["student.model"]


def test_changed_lr_reruns_the_changed_trials_and_says_which_keys(
    tmp_path: Path, models: FakeModels, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    old, new = spec(), spec(lr=1e-3)
    shared = run_identity(models, "traceskey", EVAL)
    trials = make_plan(old).trials
    for t in trials:
        finish(out, old, t, shared)
    (trial_dir(str(out), trials[0].trial_id) / "checkpoint_0000002").mkdir()
    assert plan_resume(old, trials, str(out), shared).pending == []  # same settings: all finished

    resume = plan_resume(new, trials, str(out), shared)
    assert resume.pending == trials
    said = capsys.readouterr().out
    assert said.count("settings changed since it last ran (training.lr: 0.0003 -> 0.001)") == 2
    # the old folders (record and checkpoints) are moved aside, so nothing of the old settings resumes
    assert read_record(str(out), trials[0].trial_id) is None
    stale = list((out / "stale").glob(f"{trials[0].trial_id}-*/trial"))
    assert (
        len(stale) == 1
        and (stale[0] / "checkpoint_0000002").is_dir()
        and (stale[0] / "result.json").is_file()
    )
    assert all(resume.finished(str(out), t) is None for t in trials)


def test_an_unfinished_trial_started_with_other_settings_starts_afresh(
    tmp_path: Path, models: FakeModels
) -> None:
    out = tmp_path / "out"
    shared = run_identity(models, "traceskey", EVAL)
    trial = make_plan(spec()).trials[0]
    settings = trial_settings(spec(), trial, shared)
    mark_started(str(out), trial.trial_id, {"fingerprint": fingerprint(settings), "settings": settings})
    (trial_dir(str(out), trial.trial_id) / "checkpoint_0000004").mkdir()
    assert plan_resume(spec(), [trial], str(out), shared).pending == [trial]
    assert (trial_dir(str(out), trial.trial_id) / "checkpoint_0000004").is_dir()  # same settings: resumes
    plan_resume(spec(zero_stage=1), [trial], str(out), shared)
    assert not trial_dir(str(out), trial.trial_id).exists()


def test_a_broken_record_reruns_with_a_warning_and_the_table_still_renders(
    tmp_path: Path, models: FakeModels, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    s = spec()
    shared = run_identity(models, "traceskey", EVAL)
    ok, broken = make_plan(s).trials
    finish(out, s, ok, shared)
    finish(out, s, broken, shared)
    path = trial_dir(str(out), broken.trial_id) / "result.json"
    path.write_text(path.read_text()[:40])  # cut short, as by a full disk
    resume = plan_resume(s, [ok, broken], str(out), shared)
    assert resume.pending == [broken]
    assert f"trial {broken.trial_id} runs again" in capsys.readouterr().out
    path.write_text(json.dumps({"status": "ok"}))  # valid JSON, not a record
    assert read_record(str(out), broken.trial_id) is None
    records = [r for t in (ok, broken) if (r := resume.finished(str(out), t))]
    write_results(records, out, None)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial_id"] for r in rows] == [ok.trial_id]
    assert rows[0]["fingerprint"] == resume.identities[ok.trial_id]["fingerprint"]
