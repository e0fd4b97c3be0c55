"""benchmarks/gpu_check.py cannot rot: its CPU dry mode (tiny Qwen3, DeepSpeed on gloo) runs the same code
path as on the GPU, in a fresh process, and writes the JSON the GPU run would."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gpu_check_dry_mode_runs_raykds_step_without_ray_or_vllm(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "MASTER_PORT": str(_free_port()), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry", "--out", str(out)],
        cwd=tmp_path,  # the script finds raykd from its own location, as on the device machine
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry"] is True and result["ray_or_vllm_modules_loaded"] == []
    steps = result["train_step"]
    for length in result["settings"]["lengths"]:
        full, half = steps[str(length)]["1.0"], steps[str(length)]["0.5"]
        # prompt rows are cached, so every token but the first is a target; f = 0.5 keeps ceil(L / 2) tokens
        assert full["supervised_tokens"] == length - 1
        assert half["supervised_tokens"] == math.ceil(length / 2) - 1
        assert half["forward_tokens"] < full["forward_tokens"]
        for figures in (full, half):
            assert math.isfinite(figures["loss"]) and figures["loss"] > 0 and figures["step_s"] > 0
    loss = result["kd_loss"]
    # the chunked loss and the full-vocabulary reference see the same inputs: the same loss
    assert loss["loss_rel_diff"] < 1e-2, loss
    assert loss["ours_peak_above_baseline_bytes"] >= 0 and loss["naive_peak_above_baseline_bytes"] > 0
