"""What a trial's result depends on: its settings, named by spec key, and their fingerprint.

A finished trial's record carries both. A rerun into the same output folder compares them with the
current spec, so an old record is never shown as the result of settings it did not run with: the trials
whose settings changed are run again, and the message names the keys that changed.

Models enter by content (a fingerprint of their folder, see raykd.traces.store.fingerprint_path) and by
revision where the run knows one (a hub commit), not by path: moving a cache folder changes no result,
replacing the weights in place does. Pure Python: no Ray.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raykd.grid import Trial
from raykd.spec import SweepSpec
from raykd.traces.store import fingerprint_path, problems_digest
from raykd.trial import OK, read_record, read_started, retire

# Training keys that change how a trial runs or what it keeps, not what it computes: changing one (say,
# turning gradient checkpointing on after an out-of-memory error, which recomputes the same activations)
# must not rerun the finished trials.
NOT_RESULTS = frozenset(
    {
        "training.log_every",
        "training.checkpoint_every",
        "training.keep_optimizer_state",
        "training.gradient_checkpointing",
    }
)


def model_identity(model: str, revision: str | None = None) -> str:
    """A model's identity: the content fingerprint of its folder (or its hub name when there is no folder),
    with the revision appended when one is known."""
    content = fingerprint_path(model)[:16] if Path(model).exists() else model
    return f"{content}@{revision}" if revision else content


def run_identity(models: Any, traces_key: str, eval_problems: list[Any]) -> dict[str, str]:
    """The shared inputs of every trial: traces, held-out problems, models. ``models`` is raykd.run.Models;
    optional ``teacher_revision`` / ``student_revision`` attributes (hub commits) join the identity."""
    return {
        "traces.key": traces_key,
        "problems.eval": problems_digest(eval_problems)[:16],
        "teacher.model": model_identity(models.teacher_dir, getattr(models, "teacher_revision", None)),
        "student.model": model_identity(models.student_dir, getattr(models, "student_revision", None)),
        "tokenizer": model_identity(models.tokenizer_dir),
    }


def trial_settings(spec: SweepSpec, trial: Trial, shared: dict[str, str]) -> dict[str, Any]:
    """Every setting that changes ``trial``'s result, flat, keyed by its spec path (``training.lr``).

    Placement (custom resources, CPUs per worker, concurrency) is left out: it changes where a trial runs,
    not what it computes. Workers and GPUs stay in: they change the data split and the precision.
    """
    settings: dict[str, Any] = {
        "trial.fraction": trial.fraction,
        "trial.segments": list(trial.segments),
        "trial.seed": trial.seed,
        "problems.answer_check": spec.problems.answer_check,
        "resources.workers_per_trial": spec.resources.workers_per_trial,
        "resources.gpus_per_worker": spec.resources.gpus_per_worker,
        "generation.gpus_per_engine": min(1, spec.generation.gpus_per_engine),  # the evaluator's device
        "student.trust_remote_code": spec.student.trust_remote_code,
        **shared,
    }
    settings |= _flat("training", spec.training.model_dump())
    settings |= _flat("evaluation", spec.evaluation.model_dump())
    return {k: v for k, v in settings.items() if k not in NOT_RESULTS}


def fingerprint(settings: dict[str, Any]) -> str:
    """A short hash of ``settings`` (order-free), shown in results.csv."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def changed_keys(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every setting that differs (a record without settings: every key)."""
    old = old or {}
    keys = sorted(set(old) | set(new))
    return [
        f"{k}: {old.get(k, '(none)')} -> {new.get(k, '(none)')}" for k in keys if old.get(k) != new.get(k)
    ]


def _flat(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out |= _flat(f"{prefix}.{key}", value)
        else:
            out[f"{prefix}.{key}"] = value
    return out


@dataclass
class Resume:
    """Which trials of the plan still run, with the identity each runs under."""

    pending: list[Trial]
    identities: dict[str, dict[str, Any]]  # trial id -> {"fingerprint", "settings"}
    changed: dict[str, list[str]] = field(default_factory=dict)  # trial id -> 'key: old -> new' lines

    def finished(self, output_dir: str, trial: Trial) -> dict[str, Any] | None:
        """The trial's record if it belongs to the current settings (else None: never shown as current)."""
        record = read_record(output_dir, trial.trial_id)
        current = self.identities[trial.trial_id]["fingerprint"]
        return record if record is not None and record.get("fingerprint") == current else None


def plan_resume(spec: SweepSpec, trials: list[Trial], output_dir: str, shared: dict[str, str]) -> Resume:
    """Sort the trials into finished (an ok record of the current settings) and pending; a trial whose record
    or started checkpoints belong to other settings is moved aside (raykd.trial.retire) and runs afresh."""
    resume = Resume(pending=[], identities={})
    for trial in trials:
        settings = trial_settings(spec, trial, shared)
        identity = {"fingerprint": fingerprint(settings), "settings": settings}
        resume.identities[trial.trial_id] = identity
        record = read_record(output_dir, trial.trial_id)
        previous = record if record is not None else read_started(output_dir, trial.trial_id)
        if previous is not None and previous.get("fingerprint") != identity["fingerprint"]:
            resume.changed[trial.trial_id] = changed_keys(previous.get("settings"), settings)
            moved = retire(output_dir, trial.trial_id, previous.get("fingerprint"))
            _log_changed(trial.trial_id, resume.changed[trial.trial_id], moved)
        elif record is not None and record["status"] == OK:
            continue
        resume.pending.append(trial)
    return resume


def _log_changed(trial_id: str, keys: list[str], moved: Path) -> None:
    shown = "; ".join(keys[:6]) + (f"; and {len(keys) - 6} more" if len(keys) > 6 else "")
    print(
        f"[raykd] trial {trial_id}: settings changed since it last ran ({shown or 'settings not recorded'}); "
        f"it runs again, its old results moved to {moved}",
        flush=True,
    )
