"""The sweep spec and the dry-run CLI: every shipped YAML validates, every class of bad input is refused."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raykd.plan import make_plan
from raykd.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
TINY = yaml.safe_load((ROOT / "sweeps" / "tiny.yaml").read_text())


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "raykd.sweep", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def problems_of(mutate) -> list[str]:
    data = copy.deepcopy(TINY)
    mutate(data)
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return info.value.problems


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_yaml_validates(path: Path) -> None:
    spec = load_spec(path)
    assert make_plan(spec).trials


def test_paper_grid_has_60_trials_in_dry_run() -> None:
    result = run_cli("sweeps/grid.yaml", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "60 trials" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.strip().startswith(tuple("0123456789"))]
    assert len(rows) == 60
    labels = {line.split()[3] for line in rows}
    assert labels == {"A", "P+A", "CoT", "CoT+A", "P+CoT", "P+CoT+A"}
    assert "/mnt/raykd/runs/paper-grid" in result.stdout


def test_tiny_dry_run_lists_grid_and_resources() -> None:
    result = run_cli("sweeps/tiny.yaml", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "6 trials" in result.stdout and "f0.25_CoT_s0" in result.stdout
    assert "per trial:" in result.stdout and "peak" in result.stdout


def test_spec_help_lists_every_section() -> None:
    result = run_cli("--spec-help")
    assert result.returncode == 0
    for key in ("sweep.truncation", "training.kd.divergence", "resources.gpus_per_worker", "output.dir"):
        assert key in result.stdout


def test_unknown_keys_at_every_level_with_did_you_mean() -> None:
    found = problems_of(
        lambda d: (
            d.update(sweeep=1),
            d["training"].update(lerning_rate=1),
            d["training"]["kd"].update(lamda=1),
        )
    )
    assert len(found) == 3
    assert any(p.startswith("sweeep: unknown key; did you mean 'sweep'") for p in found)
    assert any(p.startswith("training.lerning_rate: unknown key") for p in found)
    assert any(p.startswith("training.kd.lamda: unknown key") for p in found)


def test_every_bad_fraction_reported_at_once() -> None:
    found = problems_of(lambda d: d["sweep"].update(truncation=[0.5, 1.5, "abc", 0, True]))
    assert [p.split(":")[0] for p in found] == [
        "sweep.truncation[1]",
        "sweep.truncation[2]",
        "sweep.truncation[3]",
        "sweep.truncation[4]",
    ]
    assert "1.5 is not in (0, 1]" in found[0]
    assert "'abc'" in found[1]


def test_bad_segment_sets() -> None:
    found = problems_of(lambda d: d["sweep"].update(segments=[[], ["cot", "answr"], ["cot"]]))
    assert found[0].startswith("sweep.segments[0]: empty segment set")
    assert found[1].startswith("sweep.segments[1]: unknown segment 'answr' (did you mean 'answer'?)")


def test_duplicate_axis_values() -> None:
    found = problems_of(
        lambda d: d["sweep"].update(
            truncation=[0.5, 0.5], seeds=[1, 1], segments=[["cot", "answer"], ["answer", "cot"]]
        )
    )
    assert {p.split(":")[0] for p in found} == {"sweep.truncation", "sweep.segments", "sweep.seeds"}
    assert all("listed twice" in p for p in found)


def test_missing_required_fields() -> None:
    found = problems_of(lambda d: (d.pop("teacher"), d["sweep"].pop("truncation")))
    assert {p.split(":")[0] for p in found} == {"teacher", "sweep.truncation"}
    assert all("required but missing" in p for p in found)


def test_wrong_types_are_not_coerced() -> None:
    found = problems_of(
        lambda d: (d["training"].update(epochs="two", lr="1e-3"), d["generation"].update(engines=1.5))
    )
    assert {p.split(":")[0] for p in found} == {"training.epochs", "training.lr", "generation.engines"}


def test_zero_or_negative_resources_and_concurrency() -> None:
    found = problems_of(
        lambda d: (
            d["resources"].update(workers_per_trial=0, gpus_per_worker=-1),
            d["sweep"].update(max_concurrent_trials=0),
        )
    )
    assert {p.split(":")[0] for p in found} == {
        "resources.workers_per_trial",
        "resources.gpus_per_worker",
        "sweep.max_concurrent_trials",
    }


def test_remote_code_is_off_unless_asked() -> None:
    spec = parse_spec(copy.deepcopy(TINY))
    assert spec.teacher.trust_remote_code is False and spec.student.trust_remote_code is False


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such file"),
        ("", "the file is empty"),
        ("a: [1, 2\nb: }", "not valid YAML at line 2"),
        ("- 1\n- 2\n", "must hold a YAML mapping"),
        ("!!python/object/apply:os.system ['echo pwned']", "not valid YAML"),
    ],
    ids=["missing", "empty", "not-yaml", "list", "unsafe-tag"],
)
def test_bad_files_exit_2_without_traceback(tmp_path: Path, content: str | None, expected: str) -> None:
    path = tmp_path / "spec.yaml"
    if content is not None:
        path.write_text(content)
    result = run_cli(str(path), "--dry-run")
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_bad_spec_exits_2_and_names_every_key(tmp_path: Path) -> None:
    data = copy.deepcopy(TINY)
    data["sweep"]["truncation"] = [0.5, 2.0]
    data["resources"]["cpus_per_worker"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    result = run_cli(str(path))  # not even a dry run: nothing may start
    assert result.returncode == 2
    assert "sweep.truncation[1]: 2.0 is not in (0, 1]" in result.stderr
    assert "resources.cpus_per_worker" in result.stderr
    assert "Traceback" not in result.stderr


def test_dry_run_rejects_a_batch_that_does_not_split_over_the_workers(tmp_path: Path) -> None:
    """Every trial of such a spec would fail in its first worker, after the traces are generated: the dry
    run refuses it, naming the keys, the values and a batch size that works."""
    data = copy.deepcopy(TINY)
    data["training"] |= {"batch_size": 30, "micro_batch_size": 4}
    data["resources"]["workers_per_trial"] = 2
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump(data))
    result = run_cli(str(path), "--dry-run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        "training.batch_size: 30 is not a multiple of training.micro_batch_size x "
        "resources.workers_per_trial (4 x 2 = 8)" in result.stderr
    )
    assert "(e.g. 32)" in result.stderr
    # with a token budget, only the workers share a step's sequences
    tokens = lambda d: d["training"].update(batch_size=5, micro_batch_tokens=512)  # noqa: E731
    assert problems_of(lambda d: (tokens(d), d["resources"].update(workers_per_trial=2))) == [
        "training.batch_size: 5 is not a multiple of resources.workers_per_trial (2); every worker takes the "
        "same share of a step, so use a multiple of 2 (e.g. 6)"
    ]


def test_rules_across_fields_are_the_specs() -> None:
    """Tensor parallelism needs the GPUs, vLLM's scheduler its token budget, the skew KL an alpha below 1."""
    tp = problems_of(lambda d: d["generation"].update(gpus_per_engine=1, tensor_parallel=2))
    assert tp == ["generation: tensor_parallel 2 exceeds gpus_per_engine 1; give each engine at least "
                  "tensor_parallel GPUs"]  # fmt: skip
    seqs = problems_of(lambda d: d["generation"].update(max_num_seqs=512, max_num_batched_tokens=256))
    assert "generation: max_num_seqs 512 exceeds max_num_batched_tokens 256" in seqs[0]
    skew = problems_of(lambda d: d["training"]["kd"].update(divergence="skew_reverse_kl", skew_alpha=1.0))
    assert skew[0].startswith("training.kd.skew_alpha: 1.0 is invalid")


def test_trial_config_round_trips_through_its_dump() -> None:
    """Tune and Ray Train carry each trial's config as its dump; validated again, it is the same config."""
    from raykd.plan import ModelPaths, TrialConfig, trial_config

    spec = parse_spec(copy.deepcopy(TINY))
    plan = make_plan(spec)
    models = ModelPaths(student_dir="/m/student", teacher_dir="/m/teacher", tokenizer_dir="/m/teacher")
    paths = {"traces_path": "/t", "eval_problems_path": "/e.jsonl"}
    for trial in plan.trials:
        cfg = trial_config(spec, plan, trial, models, paths, {"fingerprint": "abc"})
        again = TrialConfig.model_validate(cfg.model_dump())
        assert again == cfg and again.trial_id == trial.trial_id
        assert again.training.kd == spec.training.kd and again.step_sequences == 32
        assert again.student_out == f"{plan.output_dir}/trials/{trial.trial_id}/student"


def test_gpu_hour_estimate_follows_the_kept_fraction() -> None:
    from raykd.plan import ASSUMED, gpu_hours

    grid = yaml.safe_load((ROOT / "sweeps" / "grid.yaml").read_text())

    def training_hours(fractions: list[float]) -> float:
        data = copy.deepcopy(grid)
        data["sweep"]["truncation"] = fractions
        data["sweep"]["segments"] = [["cot"]]
        spec = parse_spec(data)
        plan = make_plan(spec)
        startup = len(plan.trials) * 4 * ASSUMED["startup_h_per_job"]
        return gpu_hours(spec, plan)["training"] - startup

    assert training_hours([0.5]) == pytest.approx(0.5 * training_hours([1.0]))
    assert training_hours([0.25, 1.0]) == pytest.approx(1.25 * training_hours([1.0]))
    tiny = load_spec(ROOT / "sweeps" / "tiny.yaml")
    assert sum(gpu_hours(tiny, make_plan(tiny)).values()) == 0  # a CPU run costs no GPU-hours
