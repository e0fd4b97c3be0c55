"""`ray job submit -- python -m raykd.sweep ...` against a head started here with `ray start --head`.

The head gets its own ports and temp folder, and the test stops only the processes that head started (never
`ray stop`, which ends every Ray process on the machine). Ray 2.60 keeps token auth on: the client sends the
token `ray start` wrote, as the README tells users to.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from ray_head import RAY, ROOT, local_head, reduced_tiny, resources_arg


@pytest.mark.slow
def test_job_submitted_to_a_local_head_runs_the_sweep(tmp_path: Path, cache_dir: Path) -> None:
    spec = reduced_tiny(tmp_path, "job", truncation=[1.0], segments=[["cot"]])
    with local_head("--num-cpus", "4", *resources_arg({"raykd_head": 1000})) as head:
        submit = [RAY, "job", "submit", "--address", head.dashboard, "--working-dir", "."]
        submit += ["--runtime-env-json", json.dumps({"env_vars": {"RAYKD_CACHE": str(cache_dir)}})]
        submit += ["--", "python", "-m", "raykd.sweep", str(spec)]
        job = subprocess.run(submit, env=head.env, capture_output=True, text=True, timeout=1500, cwd=ROOT)
        log = job.stdout + job.stderr
        assert job.returncode == 0, log[-5000:]
        assert "succeeded" in log, log[-3000:]
    out = tmp_path / "runs" / "job"
    assert (out / "results.csv").is_file()
    assert (out / "results.md").read_text().count("| f1.00_CoT_s0 |") == 1
    assert "| f1.00_CoT_s0 | 1.00 | CoT |" in log  # the job's log ends with the table
