"""Where results go: output.dir or --output-dir, never inside a `ray job submit` working-dir copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from raykd.sweep import main

ROOT = Path(__file__).resolve().parents[1]


def _job_copy(tmp_path: Path) -> Path:
    """A folder laid out like Ray's unpacked --working-dir on the head, holding sweeps/tiny.yaml."""
    folder = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    (folder / "sweeps").mkdir(parents=True)
    shutil.copy(ROOT / "sweeps" / "tiny.yaml", folder / "sweeps" / "tiny.yaml")
    return folder


def test_relative_output_in_a_job_working_dir_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _job_copy(tmp_path)
    monkeypatch.chdir(folder)
    assert main(["sweeps/tiny.yaml", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "output.dir" in err and str(folder / "runs") in err and "--output-dir" in err


def test_output_dir_flag_wins_and_is_resolved_against_the_shell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _job_copy(tmp_path)
    monkeypatch.chdir(folder)
    kept = tmp_path / "kept"
    assert main(["sweeps/tiny.yaml", "--dry-run", "--output-dir", str(kept)]) == 0
    assert f"outputs: {kept}/tiny/" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)  # a relative --output-dir means the shell's folder, as every path does
    assert main([str(folder / "sweeps" / "tiny.yaml"), "--dry-run", "--output-dir", "elsewhere"]) == 0
    assert f"outputs: {tmp_path / 'elsewhere'}/tiny/" in capsys.readouterr().out


def test_url_output_dir_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(ROOT / "sweeps" / "tiny.yaml"), "--dry-run", "--output-dir", "s3://bucket/runs"]) == 2
    assert "--output-dir" in capsys.readouterr().err
