"""A Ray Train worker SIGKILLed after a checkpoint: the resumed trial ends with the weights of an
uninterrupted run of the same trial config.

The fault comes from outside, as a node's OOM killer would deliver it (no hook in the training loop): the test
waits for Ray Train to register a checkpoint, then kills one worker process. Train replaces the worker group
and every rank reloads the checkpoint (weights, its ZeRO optimizer partition, its position in the data and
its running sums), then goes on with the same per-epoch plan. Nothing in a step is random (no dropout, the
plan is seeded by (seed, epoch), gloo's all-reduce is deterministic), so the resumed run must reproduce the
uninterrupted one bit for bit: the exported student and the final metrics are compared exactly (measured:
equal to the bit; a difference here is a real resume bug, not float noise).

Real stack: local Ray, Train V2, DeepSpeed ZeRO-2 on gloo, two workers, a tiny random Llama, synthetic traces.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_faults import registered_checkpoint
from test_train import _train_cfg, kd_inputs

STEPS = 12  # 32 traces / 8 per step x 3 epochs: the kill after the first checkpoint lands well before the end
SETTINGS: dict[str, Any] = {"epochs": 3, "zero_stage": 2, "checkpoint_every": 2}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kd_inputs(tmp_path_factory.mktemp("resume"))


def _train_workers() -> list[int]:
    """This test process's Ray Train workers (Ray titles them `ray::RayTrainWorker...`); descendants only, so
    no other Ray on the machine is touched."""
    import psutil

    found = []
    for child in psutil.Process(os.getpid()).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if "RayTrainWorker" in " ".join(child.cmdline()):
                found.append(child.pid)
    return found


class _Killer(threading.Thread):
    """Waits for the trial's first registered checkpoint, then SIGKILLs one Train worker."""

    def __init__(self, output_dir: str, trial_id: str, timeout_s: float = 300.0):
        super().__init__(daemon=True)
        self.out, self.trial_id, self.timeout_s = Path(output_dir), trial_id, timeout_s
        self.stop = threading.Event()
        self.killed: tuple[str, int] | None = None  # (the checkpoint registered before the kill, the pid)

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        earlier = set(_train_workers())  # an earlier run's worker still exiting is not this run's
        while not self.stop.is_set() and time.monotonic() < deadline:
            checkpoint = registered_checkpoint(self.out, self.trial_id)
            workers = [pid for pid in _train_workers() if pid not in earlier] if checkpoint else []
            if workers:
                os.kill(workers[0], signal.SIGKILL)
                self.killed = (checkpoint, workers[0])
                return
            time.sleep(0.05)


def _fit(ray: Any, root: Path, name: str, killer: bool) -> tuple[Any, tuple[str, int] | None]:
    from raykd.kd.trainer import build_trainer

    cfg = _train_cfg(root, name, **SETTINGS)
    thread = _Killer(cfg.output_dir, cfg.trial_id) if killer else None
    if thread:
        thread.start()
    try:
        result = build_trainer(cfg, {"train": ray.data.read_parquet(cfg.traces_path)}).fit()
    finally:
        if thread:
            thread.stop.set()
            thread.join()
    return result, thread.killed if thread else None


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(ray_local, run_root: Path):
    import torch
    from safetensors.torch import load_file

    whole, _ = _fit(ray_local, run_root, "whole", killer=False)
    resumed, killed = _fit(ray_local, run_root, "killed", killer=True)
    assert killed is not None, "no Train worker was killed after a registered checkpoint"
    a, b = whole.metrics, resumed.metrics
    assert a["resumed_from_step"] == -1 and a["step"] == STEPS
    # The last attempt started from the checkpoint registered before the kill (or a later one) and took the
    # remaining steps only.
    registered = int(killed[0].removeprefix("checkpoint_"))
    assert registered <= b["resumed_from_step"] < b["step"] == STEPS, (killed, b["resumed_from_step"])
    print(f"\n[resume] a worker SIGKILLed after {killed[0]}; resumed from step {b['resumed_from_step']}")

    want = load_file(Path(a["student_dir"]) / "model.safetensors")
    got = load_file(Path(b["student_dir"]) / "model.safetensors")
    assert want.keys() == got.keys()
    base = load_file(run_root / "student" / "model.safetensors")
    assert not torch.equal(want["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # it trained
    differ = {k: float((want[k] - got[k]).abs().max()) for k in want if not torch.equal(want[k], got[k])}
    assert not differ, (
        f"resumed weights differ from the uninterrupted run's (max |diff| per tensor): {differ}"
    )
    # The restored running sums give the same last-epoch losses and whole-run counts.
    for key in ("loss", "ce", "kd", "supervised_tokens", "kept_tokens", "sequences", "flops"):
        assert b[key] == a[key], (key, a[key], b[key])
