"""Results of a sweep: one row per trial, retained accuracy against the full-sequence run, savings, a plot,
and the mean over seeds of every (fraction, segments) point with its spread.

Pure Python (csv, json, matplotlib on demand): reads the per-trial result records the sweep wrote, writes
results.csv (one row per trial), results.md (the tables a person reads), results.json (trials, aggregates,
references and models, for scripts) and frontier.png.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raykd.files import write_json_atomic, write_text_atomic
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


def _saved(value: float | None, full: float | None) -> float | None:
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


def _set_order(value: str | None) -> str:
    return value or ""


def _row_order(rec: dict[str, Any]) -> tuple[Any, ...]:
    return _set_order(rec.get("set")), rec["seed"], rec["segments"], rec["fraction"]


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
            row["tokens_saved_pct"] = _saved(rec.get("kept_tokens"), base.get("kept_tokens"))
            row["flops_saved_pct"] = _saved(rec.get("flops"), base.get("flops"))
            row["time_saved_pct"] = _saved(rec.get("train_s"), base.get("train_s"))
        rows.append(row)
    return rows


AGGREGATE_COLUMNS = [
    "fraction",
    "segments",
    "set",
    "n_seeds",
    "seeds",
    "accuracy_mean",
    "accuracy_std",
    "accuracy_sem",
    "retained_pct",
    "retained_pct_err",
    "kept_tokens",
    "flops",
    "train_s",
    "tokens_saved_pct",
    "flops_saved_pct",
    "time_saved_pct",
    "n_failed",
    # means over seeds of the evaluator's pass@k ({k: value}, k as text; none with one sample per problem)
    # and of the share of eval samples cut at max tokens
    "pass_at_k",
    "truncated_share",
]


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def _mean_by_key(values: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the mean over the dicts that all hold it (pass@k of trials that sampled alike)."""
    shared = set.intersection(*(set(v) for v in values)) if values else set()
    return {str(k): statistics.fmean(v[k] for v in values) for k in sorted(shared, key=int)}


def _seed_stats(trials: list[dict[str, Any]]) -> tuple[float, float | None, float]:
    """(mean, std across seeds, standard error of the mean) of the trials' accuracies.

    With one seed there is no spread across seeds; the standard error is then the trial's own (across
    problems), the only uncertainty known.
    """
    accs = [t["accuracy"] for t in trials]
    mean = statistics.fmean(accs)
    if len(accs) == 1:
        return mean, None, trials[0].get("stderr") or 0.0
    std = statistics.stdev(accs)
    return mean, std, std / math.sqrt(len(accs))


def retained(mean: float, sem: float, full_mean: float, full_sem: float) -> tuple[float, float] | None:
    """Retained % R = 100·m/m₁ of the full-sequence mean m₁, and its standard error.

    First-order propagation (the delta method) of the two standard errors u (of m) and u₁ (of m₁), taken
    as independent:

        u_R = 100 · sqrt( u² / m₁²  +  m² · u₁² / m₁⁴ )      ( = R · sqrt((u/m)² + (u₁/m₁)²) when m > 0 )

    The first form stays finite when m = 0. The trials of both points share the eval problems and seeds;
    a positive correlation between m and m₁ would shrink the true error, so treating them as independent
    errs on the wide side. None when m₁ = 0 (no ratio).
    """
    if not full_mean:
        return None
    value = 100.0 * mean / full_mean
    error = 100.0 * math.sqrt(sem**2 / full_mean**2 + mean**2 * full_sem**2 / full_mean**4)
    return value, error


def aggregate_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (fraction, segments, set): accuracy mean, std across seeds (sample std, n - 1),
    standard error of the mean (std / √n), retained % of the f = 1.0 aggregate of the same segments and
    set with its error (`retained`), and the means of tokens, FLOPs and training time with their savings
    against that aggregate. Only trials whose status is 'ok' count; n_failed counts the others.

    The eval problems are the same for every seed, so the spread is over training seeds and sampling,
    not over a fresh draw of problems.
    """
    groups: dict[tuple[float, str, str | None], list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault((rec["fraction"], rec["segments"], rec.get("set")), []).append(rec)
    stats = {}
    for key, group in groups.items():
        ok = [r for r in group if r.get("status") == OK and r.get("accuracy") is not None]
        stats[key] = (ok, len(group) - len(ok), _seed_stats(ok) if ok else None)
    full = {(seg, name): st for (f, seg, name), st in stats.items() if math.isclose(f, 1.0) and st[2]}
    order = sorted(groups, key=lambda k: (_set_order(k[2]), k[1], k[0]))
    return [_aggregate(key, *stats[key], full.get((key[1], key[2]))) for key in order]


def _aggregate(
    key: tuple[float, str, str | None],
    ok: list[dict[str, Any]],
    n_failed: int,
    seed_stats: tuple[float, float | None, float] | None,
    full: tuple[list[dict[str, Any]], int, tuple[float, float | None, float]] | None,
) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(AGGREGATE_COLUMNS)
    row |= {"fraction": key[0], "segments": key[1], "set": key[2], "n_seeds": len(ok), "n_failed": n_failed}
    row["seeds"] = sorted(r["seed"] for r in ok)
    if seed_stats is None:
        return row
    mean, std, sem = seed_stats
    row |= {"accuracy_mean": mean, "accuracy_std": std, "accuracy_sem": sem}
    for col in ("kept_tokens", "flops", "train_s"):
        row[col] = _mean([r.get(col) for r in ok])
    row["pass_at_k"] = _mean_by_key([{str(k): v for k, v in (r.get("pass_at_k") or {}).items()} for r in ok])
    row["truncated_share"] = _mean([r.get("eval_truncated_share") for r in ok])
    if full is None:
        return row
    full_ok, _, (full_mean, _, full_sem) = full
    if math.isclose(key[0], 1.0):  # the reference itself: 100 % by definition, no uncertainty
        ratio = (100.0, 0.0) if full_mean else None
    else:
        ratio = retained(mean, sem, full_mean, full_sem)
    row["retained_pct"], row["retained_pct_err"] = ratio or (None, None)
    for col, saved in (("kept_tokens", "tokens"), ("flops", "flops"), ("train_s", "time")):
        row[f"{saved}_saved_pct"] = _saved(row[col], _mean([r.get(col) for r in full_ok]))
    return row


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


def several_seeds(rows: list[dict[str, Any]]) -> bool:
    """Whether the grid ran more than one seed (then the tables and the plot show means over seeds)."""
    return len({r["seed"] for r in rows}) > 1


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


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


@dataclass(frozen=True)
class _Point:
    """One point of frontier.png: its panel (the evaluation set), line (the mask), position and error."""

    set: str | None
    segments: str
    flops: float
    accuracy: float
    error: float
    fraction: float


def _frontier_points(rows: list[dict[str, Any]], aggregates: list[dict[str, Any]] | None) -> list[_Point]:
    """The points to plot: the means over seeds (± standard error of the mean) when the grid has several
    seeds, so each mask is one line per set; else every ok trial (± stderr)."""
    if aggregates and several_seeds(rows):
        return [
            _Point(
                a["set"], a["segments"], a["flops"], a["accuracy_mean"], a["accuracy_sem"] or 0, a["fraction"]
            )
            for a in aggregates
            if a["accuracy_mean"] is not None and a["flops"]
        ]
    return [
        _Point(r["set"], r["segments"], r["flops"], r["accuracy"], r["stderr"] or 0.0, r["fraction"])
        for r in rows
        if r["status"] == OK and r["flops"] and r["accuracy"] is not None
    ]


def panel_sets(rows: list[dict[str, Any]], refs: References | None = None) -> list[str | None]:
    """The panels of frontier.png: one per evaluation set, in the table's order (one panel without sets)."""
    names: list[str | None] = list(dict.fromkeys(r.get("set") for r in rows))
    return names or list(refs.sets if refs else []) or [None]


REFERENCE_STYLES = {"teacher": "--", "student base": ":"}


def _panel(ax: Any, points: list[_Point], reference_lines: dict[str, float], title: str) -> None:
    """One set's panel: a line per segment mask, the references of that set as horizontal lines."""
    for segments in sorted({p.segments for p in points}):
        line = sorted((p for p in points if p.segments == segments), key=lambda p: p.flops)
        xs, ys, es = [p.flops for p in line], [p.accuracy for p in line], [p.error for p in line]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=segments)
        for p in line:
            ax.annotate(f"f={p.fraction:g}", (p.flops, p.accuracy), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)  # fmt: skip
    for label, value in reference_lines.items():
        ax.axhline(value, color="gray", linestyle=REFERENCE_STYLES[label], label=label)
    if points:  # log scale needs positive values; an empty panel keeps the linear frame
        ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (log)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no ok trial with FLOPs yet: an empty frame, no legend
        ax.legend(fontsize=8)


def plot_frontier(
    rows: list[dict[str, Any]],
    path: Path,
    refs: References | None = None,
    aggregates: list[dict[str, Any]] | None = None,
) -> None:
    """Write frontier.png (`frontier_figure`)."""
    import matplotlib.pyplot as plt

    fig = frontier_figure(rows, refs, aggregates)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def frontier_figure(
    rows: list[dict[str, Any]],
    refs: References | None = None,
    aggregates: list[dict[str, Any]] | None = None,
) -> Any:
    """Accuracy against training FLOPs, one line per segment mask (the quality/compute frontier), one
    panel per evaluation set with that set's reference lines; a matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = panel_sets(rows, refs)
    columns = min(3, len(names))
    grid_rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(7 * columns, 4.5 * grid_rows), squeeze=False)
    points = _frontier_points(rows, aggregates)
    means = aggregates and several_seeds(rows)
    for ax, name in zip(axes.flat, names, strict=False):
        title = "Accuracy against compute, by supervised segments" + (f": {name}" if name else "")
        _panel(ax, [p for p in points if p.set == name], refs.lines(name) if refs else {}, title)
        ax.set_ylabel("eval accuracy (pass@1" + ("; mean over seeds ± s.e.)" if means else ")"))
    for ax in list(axes.flat)[len(names) :]:
        fig.delaxes(ax)
    fig.tight_layout()
    return fig


def results_json(
    records: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    aggregates: list[dict[str, Any]],
    refs: References | None,
) -> dict[str, Any]:
    """What results.json holds: every trial (its record with the table's derived columns), the aggregates
    over seeds, the reference accuracies and the models."""
    by_id = {r["trial_id"]: r for r in records}
    refs = refs or References()
    return {
        "columns": COLUMNS,
        "trials": [by_id[row["trial_id"]] | row for row in rows],
        "aggregate_columns": AGGREGATE_COLUMNS,
        "aggregates": aggregates,
        "references": {
            "teacher_accuracy": refs.teacher_accuracy,
            "student_base_accuracy": refs.student_base_accuracy,
            **({"sets": refs.sets} if refs.sets else {}),
            **refs.extra,
        },
        "models": refs.models,
    }


def write_results(records: list[dict[str, Any]], out_dir: Path, refs: References | None = None) -> str:
    """Write results.csv, results.md, results.json and frontier.png under out_dir; return the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    per_set = by_set(records)
    rows = complete_rows(per_set)
    aggregates = aggregate_rows(per_set)
    table = markdown_table(rows, refs, aggregates)
    write_csv(rows, out_dir / "results.csv")
    write_text_atomic(out_dir / "results.md", table + "\n")
    write_json_atomic(out_dir / "results.json", results_json(records, rows, aggregates, refs), newline=True)
    plot_frontier(rows, out_dir / "frontier.png", refs, aggregates)
    return table
