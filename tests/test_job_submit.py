"""`ray job submit -- python -m raykd.sweep ...` against a head started here with `ray start --head`.

The head gets its own ports and temp folder, and the test stops only the processes that head started (never
`ray stop`, which ends every Ray process on the machine). Ray 2.60 keeps token auth on: the client sends the
token `ray start` wrote, as the README tells users to.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(tmp_path: Path) -> Path:
    spec = yaml.safe_load((ROOT / "sweeps" / "tiny.yaml").read_text())
    spec["name"] = "job"
    spec["output"]["dir"] = str(tmp_path / "runs")
    spec["problems"].update(train_size=64, eval_size=16)
    spec["training"]["epochs"] = 1
    spec["sweep"].update(truncation=[1.0], segments=[["cot"]])
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _processes_under(temp_dir: str) -> list[int]:
    """Every process whose command line names this head's temp folder (raylet, GCS, workers, dashboard)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                pids.append(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def _stop_head(temp_dir: str) -> None:
    """SIGTERM to the head's process group (never ours), then to any of its processes left, then SIGKILL."""
    import psutil

    with_pids = set(_processes_under(temp_dir))
    groups = {os.getpgid(pid) for pid in with_pids if psutil.pid_exists(pid)} - {os.getpgrp()}
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
    procs = []
    for pid in with_pids:
        try:
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=20)
    for proc in alive:
        proc.kill()


@pytest.mark.slow
def test_job_submitted_to_a_local_head_runs_the_sweep(tmp_path: Path, cache_dir: Path) -> None:
    spec = _spec(tmp_path)
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rkjob")  # short: Ray's socket paths must fit in 107 bytes
    dashboard = _free_port()
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # the job's `python` is this venv's
        RAY_TRAIN_ENABLE_STATE_TRACKING="1",
    )
    env.pop("RAY_ADDRESS", None)
    head = [RAY, "start", "--head", "--port", str(_free_port()), "--dashboard-port", str(dashboard)]
    head += ["--dashboard-host", "127.0.0.1", "--num-cpus", "4", "--resources", '{"raykd_head": 1000}']
    head += ["--temp-dir", temp_dir, "--disable-usage-stats"]
    # Its own process group, so the services `ray start` leaves running can be stopped together.
    started = subprocess.run(
        head, env=env, capture_output=True, text=True, timeout=180, start_new_session=True, cwd=ROOT
    )
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        client = dict(env, RAY_AUTH_MODE="token")
        runtime_env = f'{{"env_vars": {{"RAYKD_CACHE": "{cache_dir}"}}}}'
        submit = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", "."]
        submit += ["--runtime-env-json", runtime_env, "--", "python", "-m", "raykd.sweep", str(spec)]
        t0 = time.perf_counter()
        job = subprocess.run(submit, env=client, capture_output=True, text=True, timeout=1500, cwd=ROOT)
        log = job.stdout + job.stderr
        assert job.returncode == 0, log[-5000:]
        assert "succeeded" in log, log[-3000:]
        out = tmp_path / "runs" / "job"
        assert (out / "results.csv").is_file() and (out / "results.md").read_text().count(
            "| f1.00_CoT_s0 |"
        ) == 1
        print(f"job submit round trip {time.perf_counter() - t0:.0f}s")
    finally:
        _stop_head(temp_dir)
    assert not _processes_under(temp_dir), "the head's processes outlived the test"
