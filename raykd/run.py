"""Running a sweep for real (Ray Data traces -> Ray Tune trials -> results). Not built yet."""

from __future__ import annotations

from raykd.plan import Plan
from raykd.spec import SweepSpec


def run_sweep(spec: SweepSpec, plan: Plan) -> int:
    print(
        "\nerror: running a sweep is not available yet in this version of raykd; "
        "only --dry-run works (it validates the spec and prints the plan above)."
    )
    return 2
