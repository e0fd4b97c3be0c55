"""frontier.png: accuracy against training FLOPs, one line per segment mask, one panel per evaluation set.

matplotlib is imported when a figure is drawn, not at import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raykd.report_rows import References, several_seeds
from raykd.trial import OK


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
