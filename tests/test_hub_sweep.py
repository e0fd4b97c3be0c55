"""Models by hub id through the real stack (slow).

- A sweep whose spec names teacher.model and student.model by repo id, resolved offline (HF_HUB_OFFLINE=1)
  from a hub cache in huggingface_hub's own layout that holds the embedded teacher and student (cached
  between test runs) under `acme/tiny-teacher` and `acme/tiny-student`: `python -m raykd.sweep` completes,
  and the results name the resolved commits; a hub token set in the driver's environment appears in none of
  its output, results, checkpoints or traces.
- Joining a running Ray cluster: the Hugging Face settings travel with the job to its tasks, the token never
  does (the job's runtime_env, as the dashboard shows it, has none), and a task finds the token the safe way,
  in the shared HF_HOME.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hub_cache import add_model
from ray_head import ROOT, local_head, resources_arg

SECRET = "hf_raykdTestTokenNeverWritten0123456789"
TEACHER, STUDENT = "acme/tiny-teacher", "acme/tiny-student"


def hub_spec(tmp_path: Path, problems: Path) -> Path:
    """sweeps/tiny.yaml with models by repo id, problems from a file, made small (one trial, one epoch)."""
    spec = yaml.safe_load((ROOT / "sweeps" / "tiny.yaml").read_text())
    spec["name"] = "hub"
    spec["output"]["dir"] = str(tmp_path / "runs")
    spec["teacher"], spec["student"] = {"model": TEACHER}, {"model": STUDENT, "revision": "main"}
    spec["problems"] = {
        "source": "file",
        "path": str(problems),
        "prompt_field": "prompt",
        "train_size": 64,
        "eval_size": 16,
    }
    spec["training"]["epochs"] = 1
    spec["sweep"].update(truncation=[1.0], segments=[["cot"]], max_concurrent_trials=1)
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def files_holding(root: Path, needle: str) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and needle.encode() in path.read_bytes():
            found.append(path)
    return found


@pytest.mark.slow
def test_sweep_with_models_by_hub_id_offline(tmp_path: Path, cache_dir: Path) -> None:
    from raykd.embedded.bootstrap import bootstrap
    from raykd.problems.sources import save_problems
    from raykd.problems.tasks import make_problems

    built = bootstrap("cups", 0, cache_dir / "embedded")
    hf_home = tmp_path / "hf"
    commits = {
        "teacher": add_model(hf_home / "hub", TEACHER, Path(built.teacher_dir)),
        "student": add_model(hf_home / "hub", STUDENT, Path(built.student_dir)),
    }
    problems = save_problems(tmp_path / "cups.jsonl", make_problems("cups", "eval", 80, seed=3))
    spec = hub_spec(tmp_path, problems)
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_TOKEN=SECRET)
    env.pop("HF_HUB_CACHE", None)
    env["RAYKD_CACHE"] = str(cache_dir)
    done = subprocess.run(
        [sys.executable, "-m", "raykd.sweep", str(spec)],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    labels = {role: f"{name}@{commits[role]}" for role, name in (("teacher", TEACHER), ("student", STUDENT))}
    assert f"models: teacher {labels['teacher']}, student {labels['student']}" in done.stdout
    out = tmp_path / "runs" / "hub"
    head = (out / "results.md").read_text().splitlines()[:2]
    assert head == [f"teacher: {labels['teacher']}", f"student: {labels['student']}"]
    with open(out / "results.csv") as f:
        (row,) = csv.DictReader(f)
    assert row["status"] == "ok" and (row["teacher"], row["student"]) == (
        labels["teacher"],
        labels["student"],
    )
    record = json.loads((out / "trials" / row["trial_id"] / "result.json").read_text())
    assert (record["teacher"], record["student"]) == (labels["teacher"], labels["student"])
    # The trace key names the teacher by its commit; the store's plan says what the key stands for.
    (plan,) = (tmp_path / "runs" / "traces").glob("*/plan.json")
    assert f"hub:{TEACHER}@{commits['teacher']}" in plan.read_text()

    assert SECRET not in done.stdout + done.stderr
    assert files_holding(tmp_path / "runs", SECRET) == []


@pytest.mark.slow
def test_joined_cluster_gets_hf_settings_and_never_the_token(tmp_path: Path) -> None:
    shared_hf = tmp_path / "shared" / "huggingface"
    shared_hf.mkdir(parents=True)
    (shared_hf / "token").write_text(SECRET)  # `hf auth login` with HF_HOME on the shared storage
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    with local_head("--num-cpus", "2", *resources_arg({"raykd_head": 1000}), env={}) as head:
        driver = f"""
import json, os, ray
from pathlib import Path
from raykd.run import start_ray
from raykd.spec import load_spec
start_ray(load_spec({str(ROOT / "sweeps" / "tiny.yaml")!r}), Path({str(tmp_path / "cache")!r}))

@ray.remote
def seen():
    from huggingface_hub import get_token
    env = {{k: os.environ.get(k) for k in ("HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN")}}
    return env | {{"token": get_token()}}

from ray.util.state import list_jobs
job = ray.get_runtime_context().get_job_id()
(info,) = [j for j in list_jobs(detail=True) if j.job_id == job]
print("SEEN=" + json.dumps(ray.get(seen.remote())))
print("JOB=" + json.dumps(info.runtime_env or {{}}))
"""
        env = dict(clean, **head.env, RAY_ADDRESS=head.address, HF_HOME=str(shared_hf), HF_HUB_OFFLINE="1")
        env = {k: v for k, v in env.items() if k != "HF_TOKEN"}
        done = subprocess.run(
            [sys.executable, "-c", driver], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = dict(
        line.split("=", 1) for line in done.stdout.splitlines() if line.startswith(("SEEN=", "JOB="))
    )
    seen, job_env = json.loads(lines["SEEN"]), json.loads(lines["JOB"])
    assert seen["HF_HOME"] == str(shared_hf) and seen["HF_HUB_OFFLINE"] == "1"  # sent with the job
    assert seen["HF_TOKEN"] is None and seen["token"] == SECRET  # read from the shared HF_HOME
    assert job_env.get("env_vars", {}).get("HF_HOME") == str(shared_hf)
    assert SECRET not in json.dumps(job_env)
