"""A `ray start --head` of the test's own: free ports, its own temp folder, stopped by its own process ids.

Never `ray stop`: it ends every Ray process on the machine by name, including other users' clusters.
Also the reduced tiny spec the sweep-level tests run. Used by test_job_submit.py, test_autoscaler.py,
test_multinode.py and test_sweep_e2e.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reduced_tiny(
    tmp_path: Path,
    name: str,
    train_size: int = 64,
    eval_size: int = 16,
    worker_resources: dict[str, float] | None = None,
    output_dir: str | None = None,
    **sweep: object,
) -> Path:
    """sweeps/tiny.yaml made small (1 epoch, few problems, ``sweep`` axes overridden), written to tmp_path;
    results go to tmp_path/runs/<name>, or to ``output_dir`` as written (a relative one stays relative)."""
    import yaml

    spec = yaml.safe_load((ROOT / "sweeps" / "tiny.yaml").read_text())
    spec["name"] = name
    spec["output"]["dir"] = output_dir or str(tmp_path / "runs")
    spec["problems"].update(train_size=train_size, eval_size=eval_size)
    spec["training"]["epochs"] = 1
    spec["sweep"].update(sweep)
    if worker_resources:
        spec["resources"]["worker_resources"] = worker_resources
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_sweep(
    spec: Path | str, cache_dir: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """`python -m raykd.sweep SPEC` in a subprocess from ``cwd``, as a user types it (``env`` added:
    RAY_ADDRESS to join a cluster); the embedded models come from the tests' shared cache."""
    return subprocess.run(
        [sys.executable, "-m", "raykd.sweep", str(spec)],
        env=dict(os.environ, **(env or {}), RAYKD_CACHE=str(cache_dir)),
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=1800,
    )


@dataclass(frozen=True)
class Head:
    temp_dir: str
    gcs_port: int
    dashboard_port: int
    env: dict[str, str]  # for clients: this venv's tools first, token auth on

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def session_logs(self) -> Path:
        return Path(self.temp_dir) / "session_latest" / "logs"


@contextlib.contextmanager
def local_head(*args: str, env: dict[str, str] | None = None, gcs_port: int | None = None) -> Iterator[Head]:
    """`ray start --head` with ``args`` added (and ``env``, on ``gcs_port`` or a free one); yields the Head,
    then stops everything it started."""
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rkh")  # short: Ray's socket paths must fit in 107 bytes
    gcs, dashboard = gcs_port or free_port(), free_port()
    run_env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # jobs run this venv's `python`
        RAY_TRAIN_ENABLE_STATE_TRACKING="1",
        **(env or {}),
    )
    run_env.pop("RAY_ADDRESS", None)
    command = [RAY, "start", "--head", "--port", str(gcs), "--dashboard-port", str(dashboard)]
    command += ["--dashboard-host", "127.0.0.1", "--temp-dir", temp_dir, "--disable-usage-stats", *args]
    try:
        # Its own session and process group, so the services `ray start` leaves running can be found.
        started = subprocess.run(
            command,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=180,
            start_new_session=True,
            cwd=ROOT,
        )
        if started.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}")
        yield Head(temp_dir, gcs, dashboard, dict(run_env, RAY_AUTH_MODE="token"))
    finally:
        stop(temp_dir)
    left = processes_of(temp_dir)
    if left:
        raise RuntimeError(f"processes of the test's Ray head outlived it:\n{describe(left)}")


def processes_of(temp_dir: str) -> list[int]:
    """The head's live processes (their command lines name its temp folder) and all their descendants; never
    this process or its ancestors. Zombies are left out: they are already dead and only wait to be reaped."""
    import psutil

    ours = {os.getpid()} | {p.pid for p in psutil.Process().parents()}
    found: set[int] = set()
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.info["pid"] in ours:
                continue
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                found.add(proc.pid)
                found.update(child.pid for child in proc.children(recursive=True) if alive(child))
    return sorted(found - ours)


def alive(proc: psutil.Process) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def describe(pids: list[int]) -> str:
    """One line per process: pid, status and command line, for an error message."""
    import psutil

    lines = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc = psutil.Process(pid)
            lines.append(f"{pid} [{proc.status()}] {' '.join(proc.cmdline())[:300]}")
    return "\n".join(lines)


def stop(temp_dir: str, grace_s: float = 20.0, deadline_s: float = 60.0) -> None:
    """SIGTERM to the head's process groups (never ours) and processes, SIGKILL to what is left after
    ``grace_s``; then again, by SIGKILL, for any process the head started meanwhile (a raylet can launch a
    worker while it is being stopped), until none is left or ``deadline_s`` has passed."""
    import psutil

    deadline = time.monotonic() + deadline_s
    first = True
    while (pids := processes_of(temp_dir)) and time.monotonic() < deadline:
        groups: set[int] = set()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(pid))
        for group in groups - {os.getpgrp()}:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGTERM if first else signal.SIGKILL)
        procs = []
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc = psutil.Process(pid)
                if first:
                    proc.terminate()
                else:
                    proc.kill()
                procs.append(proc)
        _, alive = psutil.wait_procs(procs, timeout=grace_s if first else 5.0)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5.0)
        first = False


def resources_arg(resources: dict[str, float]) -> list[str]:
    return ["--resources", json.dumps(resources)]
