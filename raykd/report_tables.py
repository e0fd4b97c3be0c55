"""The markdown tables of results.md: one row per trial, the means over seeds, and the references per set.

Pure Python, on the rows of raykd.report_rows and the aggregates of raykd.report_seeds.
"""

from __future__ import annotations

from typing import Any

from raykd.report_rows import REFERENCE_ROLES, References, several_seeds
from raykd.trial import OK


def _fmt(value: Any, col: str) -> str:
    if value is None or value == "":
        return "-"
    if col == "flops":
        return f"{value:.2e}"
    if col in ("accuracy", "stderr"):
        return f"{value:.3f}"
    if col in ("kept_tokens", "supervised_tokens"):  # counts (Train reports them as floats)
        return str(round(value))
    if isinstance(value, float):
        return f"{value:.1f}" if col != "fraction" else f"{value:.2f}"
    return str(value)


# (column, header) of the numeric cells after accuracy, in table order.
NUMERIC_CELLS = [
    ("retained_pct", "retained %"),
    ("kept_tokens", "kept tok"),
    ("supervised_tokens", "sup tok"),
    ("flops", "FLOPs"),
    ("peak_mem_mb", "peak MB"),
    ("train_s", "train s"),
    ("tokens_saved_pct", "tok saved %"),
    ("flops_saved_pct", "FLOPs saved %"),
    ("time_saved_pct", "time saved %"),
]

AGGREGATE_CELLS = [
    ("kept_tokens", "kept tok"),
    ("flops", "FLOPs"),
    ("train_s", "train s"),
    ("tokens_saved_pct", "tok saved %"),
    ("flops_saved_pct", "FLOPs saved %"),
    ("time_saved_pct", "time saved %"),
]


def aggregate_table(aggregates: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: one row per (fraction, segments), mean ± std over seeds, retained % ± its error."""
    sets = any(a["set"] for a in aggregates)
    head = ["f", "segments", *(["set"] if sets else []), "seeds", "accuracy mean ± std", "retained % ± err"]
    lines = [
        "mean over seeds (± std across seeds; retained % of the f = 1.0 mean ± its error from both means)",
        "",
        "| " + " | ".join(head + [h for _, h in AGGREGATE_CELLS]) + " |",
        "|" + "---|" * (len(head) + len(AGGREGATE_CELLS)),
    ]
    for a in aggregates:
        acc, ret = "-", "-"
        if a["accuracy_mean"] is not None:
            acc = f"{a['accuracy_mean']:.3f} ± {a['accuracy_std'] or 0:.3f}"
        if a["retained_pct"] is not None:
            ret = f"{a['retained_pct']:.1f} ± {a['retained_pct_err']:.1f}"
        seeds = str(a["n_seeds"]) + (f" ({a['n_failed']} failed)" if a["n_failed"] else "")
        cells = [_fmt(a["fraction"], "fraction"), a["segments"], *([a["set"] or "-"] if sets else []), seeds]
        cells += [acc, ret]
        lines.append("| " + " | ".join(cells + [_fmt(a[c], c) for c, _ in AGGREGATE_CELLS]) + " |")
    return lines


def markdown_table(
    rows: list[dict[str, Any]],
    refs: References | None = None,
    aggregates: list[dict[str, Any]] | None = None,
) -> str:
    """The table a person reads: accuracy ± stderr, retained %, tokens, compute and savings; with more
    than one seed, then the means over seeds (``aggregates``, from `aggregate_rows`)."""
    sets = any(r.get("set") for r in rows)  # a column for the evaluation set when there are sets
    head = ["trial", "f", "segments", "seed", *(["set"] if sets else []), "status", "accuracy"]
    head += [h for _, h in NUMERIC_CELLS]
    named = {role: m for role, m in (refs.models if refs else {}).items() if m != "embedded"}
    lines = [f"{role}: {model}" for role, model in named.items()] + ([""] if named else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f} ± {r['stderr'] or 0:.3f}"
        cells = [r["trial_id"], _fmt(r["fraction"], "fraction"), r["segments"], str(r["seed"])]
        cells += [*([r["set"] or "-"] if sets else []), r["status"]]
        cells += [acc] + [_fmt(r[c], c) for c, _ in NUMERIC_CELLS]
        lines.append("| " + " | ".join(cells) + " |")
    if aggregates and several_seeds(rows):
        lines += ["", *aggregate_table(aggregates)]
    if refs and refs.sets and sets:
        lines += ["", *reference_table(refs)]
    elif refs and (refs.teacher_accuracy is not None or refs.student_base_accuracy is not None):
        lines.append("")
        if refs.teacher_accuracy is not None:
            lines.append(f"teacher accuracy (reference): {refs.teacher_accuracy:.3f}")
        if refs.student_base_accuracy is not None:
            lines.append(f"student base accuracy before distillation: {refs.student_base_accuracy:.3f}")
    failed = {r["trial_id"]: r["error"] for r in rows if r["status"] != OK}  # once, whatever its sets
    for trial_id, error in failed.items():
        lines.append(f"\n{trial_id} failed: {error}")
    return "\n".join(lines)


def reference_table(refs: References) -> list[str]:
    """Markdown lines: per set, the teacher's and the base student's pass@1 ± stderr, measured by the
    evaluator the trained students go through (raykd.references)."""
    lines = [
        "references: the teacher and the base student, by the same evaluator (pass@1 ± stderr)",
        "",
        "| set | " + " | ".join(label for _, label in REFERENCE_ROLES) + " |",
        "|---|" + "---|" * len(REFERENCE_ROLES),
    ]
    for name, roles in refs.sets.items():
        cells = []
        for role, _ in REFERENCE_ROLES:
            got = roles.get(role) or {}
            known = got.get("accuracy") is not None
            cells.append(f"{got['accuracy']:.3f} ± {got.get('stderr') or 0:.3f}" if known else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines
