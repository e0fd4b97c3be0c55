"""Models by hub id or folder (raykd.models): resolution from a hand-built hub cache with HF_HUB_OFFLINE=1,
every bad input named by its spec key, the commit in the trace key and the results, the dry run's check, and
the Hugging Face settings (never a token) that travel to Ray processes.

The cache is laid out as huggingface_hub writes it (tests/hub_cache.py); huggingface_hub itself reads it.
The model files are stand-ins (resolution reads names, not weights); the slow end-to-end run with real
models by repo id is in test_hub_sweep.py.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hub_cache import add_model, drop_blob, repo_folder

from raykd import models
from raykd.models import ModelError, content_id, forwarded_env, hub_snapshot, resolve_models
from raykd.problems.tasks import make_problems
from raykd.report import write_results
from raykd.report_rows import References
from raykd.spec import SpecError, parse_spec
from raykd.traces import pipeline
from raykd.traces.store import content_key, fingerprint_path

ROOT = Path(__file__).resolve().parents[1]
TEACHER, STUDENT = "acme/tiny-teacher", "acme/tiny-student"


def model_folder(path: Path, weights: str = "model.safetensors", tokenizer: bool = True) -> Path:
    """A folder with the files a model needs (stand-in bytes)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8, "tag": path.name}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    if weights:
        (path / weights).write_bytes(b"weights of " + path.name.encode())
    if tokenizer:
        (path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
        (path / "tokenizer_config.json").write_text("{}")
    (path / "README.md").write_text("not needed by a run")
    return path


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache under HF_HOME, offline."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "hf" / "hub"
    path.mkdir(parents=True)
    return path


@pytest.fixture
def commits(hub: Path, tmp_path: Path) -> dict[str, str]:
    """Teacher and student under repo ids; the teacher also has a tagged second commit."""
    teacher = add_model(hub, TEACHER, model_folder(tmp_path / "src" / "teacher"))
    student = add_model(hub, STUDENT, model_folder(tmp_path / "src" / "student"))
    v2 = model_folder(tmp_path / "src" / "teacher-v2")
    (v2 / "model.safetensors").write_bytes(b"new weights")
    tagged = add_model(hub, TEACHER, v2, revision="v2")
    return {"teacher": teacher, "student": student, "teacher_v2": tagged}


def spec_for(
    teacher: str = TEACHER,
    student: str = STUDENT,
    teacher_opts: dict | None = None,
    student_opts: dict | None = None,
) -> Any:
    data = {
        "name": "hub",
        "problems": {"source": "file", "path": "/data/problems.jsonl"},
        "teacher": {"model": teacher, **(teacher_opts or {})},
        "student": {"model": student, **(student_opts or {})},
        "sweep": {"truncation": [0.5, 1.0], "segments": [["cot"]]},
        "output": {"dir": "/tmp/unused"},
    }
    return parse_spec(data)


def problems_of(spec: Any) -> list[str]:
    with pytest.raises(ModelError) as caught:
        resolve_models(spec)
    return caught.value.problems


# --- resolution --------------------------------------------------------------------------------------------


def test_hub_ids_resolve_offline_to_snapshot_folders_and_commits(hub: Path, commits: dict[str, str]) -> None:
    resolved = resolve_models(spec_for())
    teacher, student = resolved["teacher"], resolved["student"]
    assert teacher.revision == commits["teacher"] and student.revision == commits["student"]
    assert Path(teacher.path) == repo_folder(hub, TEACHER) / "snapshots" / commits["teacher"]
    assert json.loads((Path(teacher.path) / "config.json").read_text())["tag"] == "teacher"
    assert teacher.label == f"{TEACHER}@{commits['teacher']}"
    assert hub_snapshot(teacher.path) == (TEACHER, commits["teacher"])


def test_revision_by_tag_and_by_commit(hub: Path, commits: dict[str, str]) -> None:
    by_tag = resolve_models(spec_for(teacher_opts={"revision": "v2"}))["teacher"]
    assert by_tag.revision == commits["teacher_v2"]
    assert (Path(by_tag.path) / "model.safetensors").read_bytes() == b"new weights"
    by_commit = resolve_models(spec_for(teacher_opts={"revision": commits["teacher"]}))["teacher"]
    assert by_commit.revision == commits["teacher"]


def test_folder_models_stay_folders(tmp_path: Path, hub: Path) -> None:
    teacher, student = model_folder(tmp_path / "t"), model_folder(tmp_path / "s", "pytorch_model.bin")
    resolved = resolve_models(spec_for(str(teacher), str(student)))
    assert resolved["teacher"].path == str(teacher) and resolved["teacher"].revision is None
    assert resolved["student"].label == str(student)


def test_embedded_pair_needs_no_resolution() -> None:
    data = {
        "name": "e",
        "teacher": {"model": "embedded"},
        "student": {"model": "embedded"},
        "sweep": {"truncation": [1.0], "segments": [["cot"]]},
        "output": {"dir": "/tmp/unused"},
    }
    assert resolve_models(parse_spec(data)) == {}


# --- bad input: each names the spec key and the fix, all at once --------------------------------------------


def test_hub_id_not_in_the_offline_cache(hub: Path, commits: dict[str, str]) -> None:
    (problem,) = problems_of(spec_for(student="acme/absent"))
    assert problem.startswith("student.model: 'acme/absent' is neither a local folder nor a hub model")
    assert "HF_HUB_OFFLINE is set" in problem and "hf download acme/absent" in problem
    assert str(hub) in problem


def test_revision_that_does_not_exist(hub: Path, commits: dict[str, str]) -> None:
    (problem,) = problems_of(spec_for(teacher_opts={"revision": "v9"}))
    assert problem.startswith("teacher.revision: 'v9' of acme/tiny-teacher is not in the Hugging Face cache")
    assert "main" in problem and "v2" in problem  # what the cache does hold
    sha = "f" * 40
    (problem,) = problems_of(spec_for(teacher_opts={"revision": sha}))
    assert problem.startswith(f"teacher.revision: '{sha}'")


def test_snapshot_whose_weights_are_missing(hub: Path, commits: dict[str, str]) -> None:
    drop_blob(hub, STUDENT, commits["student"], "model.safetensors")  # an interrupted download
    (problem,) = problems_of(spec_for())
    assert problem.startswith(f"student.model: the hub model {STUDENT} at commit {commits['student']}")
    assert "has no weights" in problem and "fetch it again with network access" in problem


def test_snapshot_without_tokenizer(hub: Path, tmp_path: Path, commits: dict[str, str]) -> None:
    add_model(hub, "acme/no-tok", model_folder(tmp_path / "src" / "no-tok", tokenizer=False))
    (problem,) = problems_of(spec_for(student="acme/no-tok"))
    assert problem.startswith("student.model: the hub model acme/no-tok") and "has no tokenizer" in problem


def test_weight_shards_an_index_names(hub: Path, tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "sharded", weights="model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    teacher = model_folder(tmp_path / "t")
    (problem,) = problems_of(spec_for(str(teacher), str(folder)))
    assert problem.startswith(f"student.model: the folder {folder} lacks weight shard(s)")
    assert "model-00002-of-00002.safetensors" in problem


def test_every_folder_problem_of_both_models_at_once(tmp_path: Path, hub: Path) -> None:
    teacher = model_folder(tmp_path / "t", weights="")
    student = model_folder(tmp_path / "s", tokenizer=False)
    found = problems_of(spec_for(str(teacher), str(student)))
    assert [p.split(":")[0] for p in found] == ["teacher.model", "student.model"]
    assert "has no weights" in found[0] and "save_pretrained" in found[0]
    assert "has no tokenizer (tokenizer.json, tokenizer.model, vocab.json)" in found[1]


def test_revision_of_a_folder_is_refused(tmp_path: Path, hub: Path) -> None:
    teacher, student = model_folder(tmp_path / "t"), model_folder(tmp_path / "s")
    (problem,) = problems_of(spec_for(str(teacher), str(student), student_opts={"revision": "main"}))
    assert problem.startswith("student.revision: 'main' is set but student.model names a local folder")


def test_revision_of_the_embedded_model_is_a_spec_error() -> None:
    data = {
        "name": "e",
        "teacher": {"model": "embedded", "revision": "main"},
        "student": {"model": "embedded"},
        "sweep": {"truncation": [1.0], "segments": [["cot"]]},
        "output": {"dir": "/tmp/unused"},
    }
    with pytest.raises(SpecError) as caught:
        parse_spec(data)
    assert any(p.startswith("teacher: revision 'main' applies to hub ids") for p in caught.value.problems)


def test_missing_folder_path(tmp_path: Path, hub: Path, commits: dict[str, str]) -> None:
    (problem,) = problems_of(spec_for(teacher=str(tmp_path / "no" / "such")))
    assert (
        problem
        == f"teacher.model: no such model folder: {tmp_path / 'no' / 'such'}; give an existing "
        + ("folder or a hub id (org/name)")
    )


# --- the commit in the trace key and the results -----------------------------------------------------------


def test_trace_key_names_the_commit(hub: Path, commits: dict[str, str], tmp_path: Path) -> None:
    spec = spec_for()
    problems = make_problems("cups", "train", 4, seed=0)
    main = resolve_models(spec)["teacher"].path
    tagged = resolve_models(spec_for(teacher_opts={"revision": "v2"}))["teacher"].path
    material = pipeline.key_material(spec, problems, main, main)
    assert material["teacher"] == material["tokenizer"] == f"hub:{TEACHER}@{commits['teacher']}"
    assert content_key(pipeline.key_material(spec, problems, tagged, tagged)) != content_key(material)
    scored = spec.model_copy(update={"problems": spec.problems.model_copy(update={"source": "traces"})})
    assert pipeline.key_material(scored, problems, main, main)["teacher"] == material["teacher"]
    folder = model_folder(tmp_path / "plain")
    assert content_id(str(folder)) == fingerprint_path(folder)  # folders keep their content fingerprint


def test_results_name_teacher_and_student_at_their_commits(tmp_path: Path) -> None:
    labels = {"teacher": f"{TEACHER}@{'a' * 40}", "student": f"{STUDENT}@{'b' * 40}"}
    record = {"trial_id": "f1.00_CoT_s0", "fraction": 1.0, "segments": "CoT", "seed": 0, "status": "ok"}
    record |= {"accuracy": 0.5, "stderr": 0.1, **labels}
    table = write_results([record], tmp_path, References(models=labels))
    assert table.splitlines()[:3] == [f"teacher: {labels['teacher']}", f"student: {labels['student']}", ""]
    assert (tmp_path / "results.md").read_text().startswith(f"teacher: {labels['teacher']}\n")
    with open(tmp_path / "results.csv") as f:
        (row,) = csv.DictReader(f)
    assert (row["teacher"], row["student"]) == (labels["teacher"], labels["student"])
    embedded = write_results([record], tmp_path, References(models=dict.fromkeys(labels, "embedded")))
    assert embedded.startswith("| trial |")  # the embedded default's table is unchanged


# --- environment --------------------------------------------------------------------------------------------


def test_forwarded_env_carries_hf_settings_never_a_token() -> None:
    environ = {
        "HF_HOME": "/mnt/raykd/huggingface",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_TOKEN": "hf_secret",
        "HUGGING_FACE_HUB_TOKEN": "hf_secret",
        "PATH": "/usr/bin",
    }
    assert forwarded_env(environ) == {
        "HF_HOME": "/mnt/raykd/huggingface",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    assert not set(models.HF_SECRET_ENV) & set(models.HF_ENV)


def test_trainer_workers_get_hf_settings_not_the_token() -> None:
    from raykd.kd.trainer import WORKER_ENV

    assert {"HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"} <= set(WORKER_ENV)
    assert not set(models.HF_SECRET_ENV) & set(WORKER_ENV)


# --- the dry run --------------------------------------------------------------------------------------------


def dry_run(spec: dict[str, Any], tmp_path: Path, hf_home: Path) -> subprocess.CompletedProcess[str]:
    """`python -m raykd.sweep SPEC --dry-run` offline, reporting which heavy modules it imported."""
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    code = (
        "import sys\nfrom raykd.sweep import main\nrc = main([sys.argv[1], '--dry-run'])\n"
        "print('HEAVY=' + ','.join(m for m in ('torch', 'vllm', 'deepspeed') if m in sys.modules))\n"
        "sys.exit(rc)"
    )
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_TOKEN="hf_never_printed")
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def test_dry_run_checks_hub_models_without_heavy_imports(
    hub: Path, commits: dict[str, str], tmp_path: Path
) -> None:
    spec = yaml.safe_load((ROOT / "sweeps" / "grid.yaml").read_text())
    spec["teacher"], spec["student"] = {"model": TEACHER}, {"model": STUDENT, "revision": "main"}
    ok = dry_run(spec, tmp_path, hub.parent)
    assert ok.returncode == 0, ok.stderr
    assert f"teacher.model: {TEACHER}: cached at commit {commits['teacher']}" in ok.stdout
    assert f"student.model: {STUDENT}: cached at commit {commits['student']}" in ok.stdout
    assert "HEAVY=\n" in ok.stdout
    spec["teacher"]["revision"] = "v9"
    bad = dry_run(spec, tmp_path, hub.parent)
    assert bad.returncode == 2
    assert "teacher.revision: 'v9' of acme/tiny-teacher is not in the Hugging Face cache" in bad.stderr
    assert "hf_never_printed" not in bad.stdout + bad.stderr + ok.stdout + ok.stderr
