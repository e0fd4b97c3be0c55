"""One driver per output folder: a second is refused naming the first; the lock dies with its holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from raykd.lock import LOCK_FILE, FolderLocked, driver_lock

ROOT = Path(__file__).resolve().parents[1]
HOLD = textwrap.dedent(
    """
    import sys, time
    from raykd.lock import driver_lock
    with driver_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
    """
)


def hold_in_subprocess(folder: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_is_refused_naming_the_first_then_the_lock_dies_with_it(tmp_path: Path) -> None:
    holder = hold_in_subprocess(tmp_path)
    try:
        with pytest.raises(FolderLocked) as refused, driver_lock(tmp_path):
            pass
        message = str(refused.value)
        assert f"pid {holder.pid} on host {os.uname().nodename}" in message and str(tmp_path) in message
    finally:
        holder.send_signal(signal.SIGKILL)  # as a killed driver: no cleanup runs
        holder.wait()
    assert (tmp_path / LOCK_FILE).is_file()  # the file stays, but it is no claim any more
    with driver_lock(tmp_path) as path:
        assert f'"pid": {os.getpid()}' in path.read_text()


def test_the_same_process_cannot_hold_it_twice(tmp_path: Path) -> None:
    with driver_lock(tmp_path), pytest.raises(FolderLocked), driver_lock(tmp_path):
        pass


def test_a_second_sweep_driver_exits_2_before_starting_ray(tmp_path: Path) -> None:
    spec = yaml.safe_load((ROOT / "sweeps" / "tiny.yaml").read_text())
    spec["output"]["dir"] = str(tmp_path / "runs")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    holder = hold_in_subprocess(tmp_path / "runs" / "tiny")
    try:
        second = subprocess.run(
            [sys.executable, "-m", "raykd.sweep", str(path)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"in use by another sweep driver: pid {holder.pid}" in second.stderr
    assert (
        "ray.init" not in second.stderr
        and "Started a local Ray instance" not in second.stdout + second.stderr
    )
