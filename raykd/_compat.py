"""Workarounds for one version of DeepSpeed, vLLM or Ray, kept in one place.

Each shim names the version it is for, what it works around, and how to know when it can go. Nothing here
changes what is computed: only start-up cost or console noise.
"""

from __future__ import annotations


def skip_deepspeed_shm_comm() -> None:
    """DeepSpeed 0.19.8 on CPU JIT-compiles its shared-memory all-reduce kernel (``deepspeed_shm_comm``, with
    g++ and ninja) at the first ``init_distributed``: 60-80 s on 2 cores, on every fresh machine and once per
    environment. The kernel only speeds up all-reduce between ranks on one host; gloo does the same reduction
    without it (DeepSpeed falls back to torch.distributed when the op is None, as on builds where the op is
    incompatible). So on CPU raykd does without it.

    Can go when DeepSpeed ships the op prebuilt in its wheel or builds it lazily on the first multi-rank
    all-reduce: check ``deepspeed.comm.torch.build_shm_op`` and ``git_version_info_installed.installed_ops``.
    """
    try:
        from deepspeed.comm import torch as ds_torch_comm
    except ImportError:  # a DeepSpeed that moved it: the kernel is simply built as before
        return
    if hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = lambda: None
