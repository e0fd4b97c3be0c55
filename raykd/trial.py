"""One Ray Tune trial: distil a student at one grid point with a TorchTrainer, then evaluate it with vLLM.

The trial's record (result.json) is the source of truth for the results table and for resume: a trial with an
`ok` record of the current settings (its fingerprint, raykd.identity) is finished and is not run again; one
without restarts, and its TorchTrainer (same name, same storage) picks up the latest checkpoint Ray Train
saved. A trial whose settings changed is moved aside first (`retire`), so nothing of the old settings resumes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raykd.files import write_json_atomic
from raykd.plan import trial_dir

if TYPE_CHECKING:
    from raykd.plan import TrialConfig

RECORD = "result.json"
RECORD_KEYS = {"trial_id", "status", "fraction", "segments", "seed"}  # what the table needs
STARTED = "started.json"  # the identity (fingerprint, settings) a trial was started with
OK, FAILED = "ok", "failed"
STATUSES = (OK, FAILED)  # a trial's record: finished with a result, or failed (the error names why)


def read_record(output_dir: str, trial_id: str) -> dict[str, Any] | None:
    """The trial's record, or None when it has none or it cannot be read (the trial then counts as
    unfinished and runs again: a half-copied or hand-edited file must not crash the results table)."""
    path = trial_dir(output_dir, trial_id) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        print(f"[raykd] warning: {path} is unreadable ({error}); trial {trial_id} runs again", flush=True)
        return None
    if not isinstance(record, dict) or not RECORD_KEYS.issubset(record):
        print(f"[raykd] warning: {path} is not a trial record; trial {trial_id} runs again", flush=True)
        return None
    return record


def read_started(output_dir: str, trial_id: str) -> dict[str, Any] | None:
    """The settings a trial was last started with (written before it runs), None when unknown."""
    path = trial_dir(output_dir, trial_id) / STARTED
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def mark_started(output_dir: str, trial_id: str, identity: dict[str, Any]) -> None:
    """Note the settings a trial starts with, so a later run knows whose checkpoints its folder holds."""
    write_json_atomic(trial_dir(output_dir, trial_id) / STARTED, identity)


def retire(output_dir: str, trial_id: str, fingerprint: str | None) -> Path:
    """Move a trial's folder (record, checkpoints, student) and TensorBoard log aside, under
    ``stale/<trial>-<fingerprint>/``: a rerun with other settings must not resume its checkpoints, and
    the old results stay for whoever wants them."""
    target = (
        Path(output_dir) / "stale" / f"{trial_id}-{fingerprint or 'unknown'}-{time.strftime('%Y%m%d%H%M%S')}"
    )
    target.mkdir(parents=True, exist_ok=True)
    for source, name in (
        (trial_dir(output_dir, trial_id), "trial"),
        (Path(output_dir) / "tensorboard" / trial_id, "tensorboard"),
    ):
        if source.exists():
            os.replace(source, target / name)
    return target


def write_record(output_dir: str, trial_id: str, record: dict[str, Any]) -> None:
    """Atomically: a crash mid-write never leaves a record that claims the trial finished."""
    write_json_atomic(trial_dir(output_dir, trial_id) / RECORD, record, sort_keys=False)


def record_head(cfg: TrialConfig, status: str) -> dict[str, Any]:
    """What every record of a trial starts with: its grid point, status, settings and models."""
    trial = cfg.trial
    return {
        "trial_id": trial.trial_id,
        "fraction": trial.fraction,
        "segments": trial.segments_label,
        "seed": trial.seed,
        "status": status,
        **cfg.identity,  # fingerprint and settings: what this result belongs to
        # teacher / student as 'org/name@<commit>' (or folder, 'embedded'), as results.csv names them
        "teacher": cfg.models.teacher_label,
        "student": cfg.models.student_label,
    }


def drop_checkpoints(output_dir: str, trial_id: str) -> int:
    """Delete a finished trial's DeepSpeed checkpoints (Ray Train's `checkpoint_<step>` folders: weights and
    optimizer state, 12-16 bytes per parameter); keep the exported student, the record and the small final
    checkpoint (state only). Call it only after `write_record`. Returns the bytes freed."""
    import shutil

    freed = 0
    for folder in sorted(trial_dir(output_dir, trial_id).glob("checkpoint_*")):
        if not folder.is_dir() or folder.name == "checkpoint_final":
            continue
        freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        shutil.rmtree(folder, ignore_errors=True)
    if freed:
        mib = freed / 2**20
        print(f"[raykd] trial {trial_id}: deleted its DeepSpeed checkpoints ({mib:.1f} MiB)", flush=True)
    return freed


def check_traces(traces_path: str) -> None:
    """Refuse to train on a trace folder that changed on disk since it was written (a shard cut short by a
    full disk or a killed copy): training on it would silently use fewer or garbled traces."""
    from raykd.traces.store import verify_folder

    problems = verify_folder(traces_path)
    if problems:
        raise RuntimeError(
            f"the traces in {traces_path} are damaged ({'; '.join(problems[:3])}); run the same sweep "
            "command again: it verifies the trace folder first and generates damaged shards again"
        )


def run_trial(
    config: dict[str, Any], configs: dict[str, dict[str, Any]], shared_engine: Any | None = None
) -> None:
    """Tune function trainable (through ``tune.with_parameters``). ``config["trial"]`` is the trial id, and
    ``configs[id]`` its `raykd.plan.TrialConfig` dump, validated here once (no globals). ``shared_engine``:
    the sweep's evaluation engine (`raykd.evaluate.start_shared_engine`), None for one of the trial's own."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raykd._compat import quiet_ray_data_progress
    from raykd.kd.trainer import build_trainer
    from raykd.plan import TrialConfig

    cfg = TrialConfig.model_validate(configs[config["trial"]])
    start = time.time()
    quiet_ray_data_progress()  # one set of bars per trial and epoch would bury the step lines
    check_traces(cfg.traces_path)
    trainer = build_trainer(cfg, {"train": _read_traces(cfg.traces_path)}, callbacks=[TuneReportCallback()])
    fit_start = time.time()
    train_metrics = trainer.fit().metrics or {}
    eval_start = time.time()
    evaluations = _evaluate(cfg, train_metrics["student_dir"], shared_engine)
    evaluation = next(iter(evaluations.values()))  # the held-out problems, or the first set
    record = {
        **record_head(cfg, OK),
        "accuracy": evaluation.accuracy,
        "stderr": evaluation.stderr,
        # statuses of the eval samples ('truncated': ran to max_tokens) and how many ended their turn as the
        # chat template does: a student that never learned to stop shows here
        "eval_counts": evaluation.counts,
        "eval_end_of_turn": evaluation.end_of_turn,
        # unbiased pass@k, k = 1, 2, 4, ..., samples (none with one sample); the share cut at max_tokens
        "pass_at_k": evaluation.pass_at_k,
        "pass_at_k_stderr": evaluation.pass_at_k_stderr,
        "eval_truncated_share": evaluation.truncated_share,
        # with evaluation sets: every set's result by name (the fields above are the first set's)
        **({"sets": {name: asdict(r) for name, r in evaluations.items()}} if cfg.eval_sets_path else {}),
        "kept_tokens": train_metrics.get("kept_tokens"),
        "supervised_tokens": train_metrics.get("supervised_tokens"),
        "flops": train_metrics.get("flops"),
        "peak_mem_mb": (train_metrics.get("peak_mem_bytes") or 0) / 2**20 or None,
        "train_s": train_metrics.get("wall_s"),
        "eval_s": time.time() - eval_start,
        "wall_s": time.time() - start,
        "student_dir": train_metrics["student_dir"],
        "train_node": train_metrics.get("node_id"),  # the Ray node of training rank 0
        "train_metrics": {k: v for k, v in train_metrics.items() if isinstance(v, int | float | str)},
        "timeline_s": timeline(start, fit_start, eval_start, train_metrics),
    }
    write_record(cfg.output_dir, cfg.trial_id, record)
    if not cfg.training.keep_optimizer_state:  # only now: the record says it finished
        drop_checkpoints(cfg.output_dir, cfg.trial_id)
    tune.report({"accuracy": evaluation.accuracy, "stderr": evaluation.stderr, "done": True})


def timeline(start: float, fit_start: float, eval_start: float, train_metrics: dict[str, Any]) -> dict:
    """Seconds from the trial's start to each phase's end: what a trial spends outside its training steps
    (Tune, Ray Train and Ray Data start-up, DeepSpeed set-up, the evaluation engine). Phases in order:
    fit_start (the trainer is built), entered (the Train worker runs raykd's code), distributed (its
    process group is up), shard_read, models_built, trained (last step), saved (student written), fit_end
    (Ray Train returned), eval_end. Worker phases are rank 0's last attempt."""
    worker = {k[3:]: v for k, v in train_metrics.items() if k.startswith("at_") and isinstance(v, float)}
    stamps = {"fit_start": fit_start, **worker, "fit_end": eval_start, "eval_end": time.time()}
    return {phase: round(at - start, 1) for phase, at in stamps.items()}


def _read_traces(path: str) -> Any:
    import ray

    from raykd._compat import parquet_reads_without_footer_pool

    parquet_reads_without_footer_pool()
    return ray.data.read_parquet(path)


def _evaluate(cfg: TrialConfig, student_dir: str, shared: Any | None) -> dict[str, Any]:
    """The trained student on every evaluation set (one engine; completions kept in the trial folder), or
    on the held-out problems with the spec's evaluation settings. Results by set name."""
    from raykd.evalsets import read_sets_file
    from raykd.evaluate import evaluate_sets, evaluate_student
    from raykd.problems.tasks import Problem

    engine = {
        "gpus": cfg.eval_engine.gpus,
        "resources": cfg.eval_engine.resources,
        "trust_remote_code": cfg.models.trust_remote_code,
        "log_file": str(cfg.folder / "eval_engine.log"),
        "shared": shared,
    }
    if cfg.eval_sets_path:
        sets = read_sets_file(cfg.eval_sets_path)
        return evaluate_sets(student_dir, sets, completions_dir=cfg.folder / "eval_completions", **engine)
    lines = Path(cfg.eval_problems_path).read_text().splitlines()
    problems = [Problem(**json.loads(line)) for line in lines]
    return {"heldout": evaluate_student(student_dir, problems, cfg.evaluation, cfg.answer_check, **engine)}
