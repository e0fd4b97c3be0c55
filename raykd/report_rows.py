"""The rows of the results: one per trial and evaluation set, with retained % and savings against the
full-sequence trial, and the reference accuracies (teacher, base student) they are read against.

Pure Python; raykd.report writes them, raykd.report_seeds averages them over seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from raykd.trial import OK

COLUMNS = [
    "trial_id",
    "fraction",
    "segments",
    "seed",
    # the evaluation set (evaluation.sets) the accuracy is on; empty for the held-out problems
    "set",
    "status",
    "accuracy",
    "stderr",
    "retained_pct",
    "kept_tokens",
    "supervised_tokens",
    "flops",
    "peak_mem_mb",
    "train_s",
    "wall_s",
    "tokens_saved_pct",
    "flops_saved_pct",
    "time_saved_pct",
    "error",
    # What the row belongs to: a hash of the trial's settings, traces and models (raykd.identity); a rerun
    # with other settings gets another fingerprint and never shows this row as its own.
    "fingerprint",
    # The models, 'org/name@<commit>' for a hub model (the commit the run resolved), else the folder.
    "teacher",
    "student",
]


@dataclass
class References:
    """Accuracies to read the table against: the teacher's and the base student's (the tiny run knows
    them; raykd.references measures them), on the held-out problems or the first set, and with evaluation
    sets on every set."""

    teacher_accuracy: float | None = None
    student_base_accuracy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # role -> how the run names the model ('org/name@<commit>'): the header of results.md
    models: dict[str, str] = field(default_factory=dict)
    # set name -> role ('teacher', 'student') -> its result (accuracy, stderr, pass_at_k, truncated_share...)
    sets: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def lines(self, set_name: str | None) -> dict[str, float]:
        """label -> accuracy of the reference lines of one set (None: the held-out problems)."""
        if set_name is not None and self.sets:
            found = self.sets.get(set_name) or {}
            values = {label: (found.get(role) or {}).get("accuracy") for role, label in REFERENCE_ROLES}
        else:
            values = {"teacher": self.teacher_accuracy, "student base": self.student_base_accuracy}
        return {label: value for label, value in values.items() if value is not None}


# (role in References.sets, how tables and the plot name it)
REFERENCE_ROLES = (("teacher", "teacher"), ("student", "student base"))


def saved_pct(value: float | None, full: float | None) -> float | None:
    """Percent of ``full`` that ``value`` saves (None without both)."""
    if value is None or not full:
        return None
    return 100.0 * (1.0 - value / full)


def by_set(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per trial and evaluation set: a record with 'sets' (raykd.trial) becomes one per set,
    with that set's accuracy, stderr, pass@k and truncated share; a failed trial one per set the others
    name. Records without sets pass unchanged (their set is None)."""
    names = list(dict.fromkeys(name for r in records for name in r.get("sets") or {}))
    out = []
    for rec in records:
        sets = rec.get("sets") or {}
        if not sets and not (names and rec.get("status") != OK):
            out.append(rec | {"set": None})
            continue
        for name in sets or names:
            result = sets.get(name) or {}
            out.append(
                rec
                | {"set": name, "accuracy": result.get("accuracy"), "stderr": result.get("stderr")}
                | {
                    "pass_at_k": result.get("pass_at_k"),
                    "eval_truncated_share": result.get("truncated_share"),
                }
            )
    return out


def set_order(value: str | None) -> str:
    """Sort key of an evaluation set: the held-out problems (None) first, then by name."""
    return value or ""


def _row_order(rec: dict[str, Any]) -> tuple[Any, ...]:
    return set_order(rec.get("set")), rec["seed"], rec["segments"], rec["fraction"]


def complete_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add retained % and savings, each against the f = 1.0 trial with the same segments, seed and set
    (records from `by_set`, or without sets)."""
    full = {
        (r["segments"], r["seed"], r.get("set")): r
        for r in records
        if r.get("status") == OK and math.isclose(r["fraction"], 1.0)
    }
    rows = []
    for rec in sorted(records, key=_row_order):
        row = {col: rec.get(col) for col in COLUMNS}
        base = full.get((rec["segments"], rec["seed"], rec.get("set")))
        if base and rec.get("status") == OK:
            acc, base_acc = rec.get("accuracy"), base.get("accuracy")
            row["retained_pct"] = 100.0 * acc / base_acc if base_acc and acc is not None else None
            row["tokens_saved_pct"] = saved_pct(rec.get("kept_tokens"), base.get("kept_tokens"))
            row["flops_saved_pct"] = saved_pct(rec.get("flops"), base.get("flops"))
            row["time_saved_pct"] = saved_pct(rec.get("train_s"), base.get("train_s"))
        rows.append(row)
    return rows


def several_seeds(rows: list[dict[str, Any]]) -> bool:
    """Whether the grid ran more than one seed (then the tables and the plot show means over seeds)."""
    return len({r["seed"] for r in rows}) > 1
