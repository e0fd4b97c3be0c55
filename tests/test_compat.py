"""The version workarounds in raykd._compat take effect on the installed versions (a shim that silently does
nothing costs a minute per fresh machine, or worse)."""

from __future__ import annotations

import subprocess
import sys


def test_deepspeed_shm_kernel_is_not_built_on_cpu() -> None:
    # In a fresh interpreter: the patch is process-wide. DeepSpeed's own builder returns a module (building it
    # with g++ on first use); after the shim, the hook DeepSpeed's TorchBackend calls returns None.
    code = (
        "import importlib\n"
        "from raykd._compat import skip_deepspeed_shm_comm\n"
        "skip_deepspeed_shm_comm()\n"
        "comm = importlib.import_module('deepspeed.comm.torch')\n"
        "print('shm op:', comm.build_shm_op())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "shm op: None" in done.stdout
    assert "built successfully" not in done.stdout + done.stderr
