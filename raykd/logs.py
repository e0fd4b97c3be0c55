"""Where the output of the heavy components goes: their own log files, not the sweep's console.

A vLLM engine start prints a few dozen warning lines (Triton, tcmalloc, NUMA binding, deprecations), from
the actor and from the engine processes it spawns; Ray forwards all of it to the driver's console, where it
buries the sweep's own progress. An engine actor therefore sends its process's stdout and stderr (and so its
children's) to a log file, and keeps a handle on the console for the lines a person should see.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TextIO


def redirect_output(log_file: str | Path) -> TextIO:
    """Send this process's stdout and stderr, file descriptors included, to ``log_file`` (appended); return
    a stream on the previous stdout (the console, or Ray's log of this worker, which Ray shows there)."""
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    console = os.fdopen(os.dup(1), "w", buffering=1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return console
