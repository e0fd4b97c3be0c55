"""One driver per output folder: a lock file that names its holder and dies with it.

Two drivers on one folder (a second `ray job submit` of the same sweep) would run and write the same trials.
The lock is an exclusive `flock` on ``<output>/.driver.lock``, held for the driver's lifetime: the kernel
releases it when the process ends however it ends (SIGKILL included), so a lock left by a dead driver is
never in the way and never needs breaking by hand. The file holds the holder's host, pid and command, so the
refusal names who is running. On shared storage (NFS) Linux maps `flock` to the server's byte-range locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

LOCK_FILE = ".driver.lock"


class FolderLocked(RuntimeError):
    """Another live driver holds the output folder; the message names it."""


def _holder(handle: IO[str]) -> str:
    handle.seek(0)
    try:
        info = json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        info = {}
    if not info:
        return "another process (it has not written its name yet)"
    return (
        f"pid {info.get('pid')} on host {info.get('host')} (started {info.get('started')}: "
        f"{info.get('command')})"
    )


@contextlib.contextmanager
def driver_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder``'s driver lock for the duration of the block; FolderLocked if a live driver has it."""
    path = Path(folder) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not inherited by child processes (Python's default), so only this process's death releases it.
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderLocked(
                f"output folder {folder} is in use by another sweep driver: {_holder(handle)}. Wait for it "
                f"to finish or stop it; its lock ({path}) is released when that process ends"
            ) from None
        handle.seek(0)
        handle.truncate()
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300],
        }
        handle.write(json.dumps(info))
        handle.flush()
        try:
            yield path
        finally:
            handle.seek(0)
            handle.truncate()  # the file may stay; an empty unlocked file is no claim
