"""Results of a sweep: one row per trial, retained accuracy against the full-sequence run, savings, a plot,
and the mean over seeds of every (fraction, segments) point with its spread.

Pure Python (csv, json, matplotlib on demand): reads the per-trial result records the sweep wrote, writes
results.csv (one row per trial), results.md (the tables a person reads), results.json (trials, aggregates,
references and models, for scripts) and frontier.png. The pieces live apart: the rows and references
(raykd.report_rows), the means over seeds (raykd.report_seeds), the markdown (raykd.report_tables) and the
plot (raykd.report_plot).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from raykd.files import write_json_atomic, write_text_atomic
from raykd.report_plot import plot_frontier
from raykd.report_rows import COLUMNS, References, by_set, complete_rows
from raykd.report_seeds import AGGREGATE_COLUMNS, aggregate_rows
from raykd.report_tables import markdown_table


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


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
