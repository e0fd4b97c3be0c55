"""Results of a sweep: one row per trial, retained accuracy against the full-sequence run, savings, a plot.

Pure Python (csv, matplotlib on demand): reads the per-trial result records the sweep wrote, writes
results.csv, results.md and frontier.png.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COLUMNS = [
    "trial_id",
    "fraction",
    "segments",
    "seed",
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
    """Accuracies to read the table against (the tiny run knows its teacher and student base)."""

    teacher_accuracy: float | None = None
    student_base_accuracy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # role -> how the run names the model ('org/name@<commit>'): the header of results.md
    models: dict[str, str] = field(default_factory=dict)


def _saved(value: float | None, full: float | None) -> float | None:
    if value is None or not full:
        return None
    return 100.0 * (1.0 - value / full)


def complete_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add retained % and savings, each against the f = 1.0 trial with the same segments and seed."""
    full = {
        (r["segments"], r["seed"]): r
        for r in records
        if r.get("status") == "ok" and math.isclose(r["fraction"], 1.0)
    }
    rows = []
    for rec in sorted(records, key=lambda r: (r["seed"], r["segments"], r["fraction"])):
        row = {col: rec.get(col) for col in COLUMNS}
        base = full.get((rec["segments"], rec["seed"]))
        if base and rec.get("status") == "ok":
            acc, base_acc = rec.get("accuracy"), base.get("accuracy")
            row["retained_pct"] = 100.0 * acc / base_acc if base_acc and acc is not None else None
            row["tokens_saved_pct"] = _saved(rec.get("kept_tokens"), base.get("kept_tokens"))
            row["flops_saved_pct"] = _saved(rec.get("flops"), base.get("flops"))
            row["time_saved_pct"] = _saved(rec.get("train_s"), base.get("train_s"))
        rows.append(row)
    return rows


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


def markdown_table(rows: list[dict[str, Any]], refs: References | None = None) -> str:
    """The table a person reads: accuracy ± stderr, retained %, tokens, compute and savings."""
    head = ["trial", "f", "segments", "seed", "status", "accuracy"] + [h for _, h in NUMERIC_CELLS]
    named = {role: m for role, m in (refs.models if refs else {}).items() if m != "embedded"}
    lines = [f"{role}: {model}" for role, model in named.items()] + ([""] if named else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f} ± {r['stderr'] or 0:.3f}"
        cells = [r["trial_id"], _fmt(r["fraction"], "fraction"), r["segments"], str(r["seed"]), r["status"]]
        cells += [acc] + [_fmt(r[c], c) for c, _ in NUMERIC_CELLS]
        lines.append("| " + " | ".join(cells) + " |")
    if refs and (refs.teacher_accuracy is not None or refs.student_base_accuracy is not None):
        lines.append("")
        if refs.teacher_accuracy is not None:
            lines.append(f"teacher accuracy (reference): {refs.teacher_accuracy:.3f}")
        if refs.student_base_accuracy is not None:
            lines.append(f"student base accuracy before distillation: {refs.student_base_accuracy:.3f}")
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed:
        lines.append(f"\n{r['trial_id']} failed: {r['error']}")
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def plot_frontier(rows: list[dict[str, Any]], path: Path, refs: References | None = None) -> None:
    """Accuracy against training FLOPs, one line per segment mask (the quality/compute frontier)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in sorted({r["segments"] for r in rows}):
        pts = sorted(
            (r["flops"], r["accuracy"], r["stderr"] or 0.0, r["fraction"])
            for r in rows
            if r["segments"] == label and r["status"] == "ok" and r["flops"]
        )
        if not pts:
            continue
        xs, ys, es, fs = zip(*pts, strict=True)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
        for x, y, f in zip(xs, ys, fs, strict=True):
            ax.annotate(f"f={f:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if refs and refs.teacher_accuracy is not None:
        ax.axhline(refs.teacher_accuracy, color="gray", linestyle="--", label="teacher")
    if refs and refs.student_base_accuracy is not None:
        ax.axhline(refs.student_base_accuracy, color="gray", linestyle=":", label="student base")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (log)")
    ax.set_ylabel("eval accuracy (pass@1)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Accuracy against compute, by supervised segments")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no ok trial with FLOPs yet: an empty frame, no legend
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(records: list[dict[str, Any]], out_dir: Path, refs: References | None = None) -> str:
    """Write results.csv, results.md and frontier.png under out_dir; return the markdown table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = complete_rows(records)
    table = markdown_table(rows, refs)
    write_csv(rows, out_dir / "results.csv")
    (out_dir / "results.md").write_text(table + "\n")
    plot_frontier(rows, out_dir / "frontier.png", refs)
    return table
