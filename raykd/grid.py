"""The grid of a sweep: its points (`Trial`), their ids, and the check that no two points share one.

Below raykd.spec (whose validator runs the check) and raykd.plan (which builds the trials): standard library
only; the sweep axes are read by attribute (raykd.spec_sections.SweepAxes).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

SEGMENT_SHORT = {"prompt": "P", "cot": "CoT", "answer": "A"}  # the paper's notation, as in 'P+CoT+A'


@dataclass(frozen=True)
class Trial:
    """One point of the grid."""

    fraction: float
    segments: tuple[str, ...]
    seed: int

    @property
    def segments_label(self) -> str:
        """The paper's notation: 'P+CoT+A'."""
        return "+".join(SEGMENT_SHORT[s] for s in self.segments)

    @property
    def trial_id(self) -> str:
        """A stable, filesystem-safe name, e.g. 'f0.50_P+CoT+A_s0'; distinct grid points never share one."""
        return f"f{fraction_label(self.fraction)}_{self.segments_label}_s{self.seed}"


def fraction_label(fraction: float) -> str:
    """Two decimals when they are the exact value ('0.50'), else the shortest exact form ('0.125').

    Rounding alone would name 0.12 and 0.125 alike and give two trials one folder and one record; a float's
    repr reads back as the same float, so the label is exact for every fraction.
    """
    short = f"{fraction:.2f}"
    return short if float(short) == fraction else repr(fraction)


def duplicate_trial_ids(trials: list[Trial]) -> dict[str, list[Trial]]:
    """Trial ids that more than one grid point would get (empty for a valid grid)."""
    by_id: dict[str, list[Trial]] = {}
    for trial in trials:
        by_id.setdefault(trial.trial_id, []).append(trial)
    return {tid: group for tid, group in by_id.items() if len(group) > 1}


def grid_trials(axes: Any) -> list[Trial]:
    """Every point of the grid, in the order the table lists them."""
    return [
        Trial(fraction=f, segments=tuple(seg), seed=seed)
        for seed, seg, f in itertools.product(axes.seeds, axes.segments, sorted(axes.truncation))
    ]
