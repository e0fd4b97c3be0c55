"""What a newcomer waits for: the README's main command on a fresh copy of the repository, stage by stage.

    python benchmarks/first_run.py --out benchmarks/results/first_run.json
    python benchmarks/first_run.py --out /tmp/f.json --spec sweeps/tiny.yaml --no-cached
    python benchmarks/first_run.py --out /tmp/c.json --cache runs/cache    # only the cached run

Method. The repository's files (as git lists them: tracked, plus new files not ignored) are copied into a new
temporary folder, and `python -m raykd.sweep sweeps/tiny.yaml` runs there, as the README writes it, with its
relative `output.dir`, in an environment without RAYKD_CACHE, TORCH_EXTENSIONS_DIR or any other cache raykd
reads: the embedded models, DeepSpeed's extension and the traces are all built from scratch (the installed
packages are the only thing carried over). Then, unless --no-cached, the same command runs in a second fresh
copy with RAYKD_CACHE pointing at the first copy's cache: what a second sweep into a new output folder costs
once the models are built (the traces are generated again); `--cache DIR` measures only that run, with the
models of DIR (a RAYKD_CACHE or `runs/cache` of an earlier run). Stage times come from the run's own
`timings.json` (raykd.run.StageClock), the trials' from their records, the bootstrap's from the embedded
models' `embedded.json`.

Writes {"first": {...}, "cached": {...}, "settings": {...}}; each run: wall_s (the command, as timed from
outside), stages_s, trials (train_s, eval_s, wall_s per trial, and timeline_s: seconds from the trial's
start to the end of each of its phases, raykd.trial.timeline), the results table and the key accuracies
(f = 0.5 CoT retained %, f = 1.0 against the student base). Figures vary with the machine (cores, other
load) and, for accuracies, with its floating-point kernels: say which machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Variables that would let a run reuse what an earlier one built, or change where it looks.
CACHE_VARS = ("RAYKD_CACHE", "TORCH_EXTENSIONS_DIR", "RAY_ADDRESS", "RAYKD_TEST_CACHE")


def copy_repository(dest: Path) -> Path:
    """The repository's files, as a clone would have them (plus new files not yet committed), in ``dest``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = ROOT / name.decode()
        if source.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def run_command(repo: Path, spec: str, cache: Path | None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARS}
    if cache is not None:
        env["RAYKD_CACHE"] = str(cache)
    log = repo / "first_run.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(
            [sys.executable, "-m", "raykd.sweep", spec], cwd=repo, env=env, stdout=out, stderr=out
        ).returncode
    wall = time.perf_counter() - started
    return {"exit_code": code, "wall_s": round(wall, 1), "log": str(log)}


def read_results(repo: Path, name: str) -> dict[str, Any]:
    out = repo / "runs" / name
    timings = json.loads((out / "timings.json").read_text())
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    trials = {}
    for row in rows:
        record = json.loads((out / "trials" / row["trial_id"] / "result.json").read_text())
        trials[row["trial_id"]] = {k: round(record[k] or 0, 1) for k in ("train_s", "eval_s", "wall_s")}
        trials[row["trial_id"]]["timeline_s"] = record.get("timeline_s")
    return {
        "stages_s": timings["stages_s"],
        "sweep_total_s": timings["total_s"],
        "trials": trials,
        "accuracy": {r["trial_id"]: float(r["accuracy"]) for r in rows if r["accuracy"]},
        "retained_pct": {r["trial_id"]: float(r["retained_pct"]) for r in rows if r["retained_pct"]},
        "table": (out / "results.md").read_text(),
    }


def embedded_info(cache: Path) -> dict[str, Any]:
    infos = sorted(cache.glob("embedded/*/embedded.json"))
    if not infos:
        return {}
    info = json.loads(infos[-1].read_text())
    keep = ("steps", "seconds", "accuracy", "sloppy_agreement")
    return {
        "bootstrap_s": info["bootstrap_seconds"],
        "teacher": {k: info["teacher"][k] for k in keep},
        "student": {k: info["student"][k] for k in keep},
    }


def measure(spec: str, cache: Path | None, work: Path, label: str) -> dict[str, Any]:
    import yaml

    repo = copy_repository(work / label)
    name = yaml.safe_load((repo / spec).read_text())["name"]
    print(f"[first_run] {label}: python -m raykd.sweep {spec} in {repo}", flush=True)
    result = run_command(repo, spec, cache)
    if result["exit_code"] == 0:
        result |= read_results(repo, name)
        result |= embedded_info(cache or repo / "runs" / "cache")
    print(f"[first_run] {label}: exit {result['exit_code']}, {result['wall_s']:.0f} s", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--spec", default="sweeps/tiny.yaml", help="spec path, relative to the repository")
    p.add_argument("--no-cached", action="store_true", help="skip the second run with the models cached")
    p.add_argument("--keep", action="store_true", help="keep the temporary copies (their paths are printed)")
    p.add_argument("--cache", type=Path, help="only the cached run, with the models built in this folder")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="raykd-first-run-"))
    try:
        report: dict[str, Any] = {}
        if args.cache is None:
            report["first"] = measure(args.spec, None, work, "first")
        if args.cache is not None or (not args.no_cached and report["first"]["exit_code"] == 0):
            cache = args.cache.resolve() if args.cache else work / "first" / "runs" / "cache"
            report["cached"] = measure(args.spec, cache, work, "cached")
        report["settings"] = {
            "spec": args.spec,
            "cores": len(os.sched_getaffinity(0)),
            "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"[first_run] wrote {args.out}")
        failed = [k for k in ("first", "cached") if report.get(k, {}).get("exit_code", 0) != 0]
        return 1 if failed else 0
    finally:
        if args.keep:
            print(f"[first_run] copies kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
