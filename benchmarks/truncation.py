"""Training time and memory against the truncation fraction f = 0.25, 0.5, 1.0, same traces, same model.

    python benchmarks/truncation.py --out benchmarks/results/truncation.json     # CPU (fp32) or GPU (bf16)
    python benchmarks/truncation.py --out /tmp/t.json --traces DIR --student DIR # your traces and student

Writes {"0.25": {"time_ratio": .., "peak_mem_ratio": ..}, "0.5": {...}, "1.0": {...}, "settings": {...}}:
ratios to f = 1.0 of the wall time of one training epoch, and of the peak memory of the training step above
what the process held before its first timed step (weights, optimizer state). Each fraction's entry also
holds its absolute figures. Targets at f = 0.5: time_ratio <= 0.55, peak_mem_ratio <= 0.6.

Method. Every fraction runs in a fresh subprocess (this file with --child), so that no fraction inherits
another's allocator state: the same synthetic traces (seeded; chains of thought of 1.4k-2k tokens, so that
activations matter) or the Parquet traces given, the same student (a seeded tiny Llama, or the folder given),
the lead-span policy with every segment supervised, and `raykd.kd.step.train_step` (the Ray worker's step) on
a DeepSpeed engine at world size 1, ZeRO-2. One warm-up step allocates the optimizer state and thread pools;
then the memory baseline is taken (raykd.kd.memory.PeakMemory: VmHWM after clear_refs on CPU, with glibc's
mmap threshold fixed so that freed tensors leave the resident set; max_memory_allocated on GPU) and `--epochs`
epochs are timed; the fastest counts (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FRACTIONS = (0.25, 0.5, 1.0)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--traces", help="a trace Parquet folder (default: synthetic long traces)")
    p.add_argument("--student", help="a Hugging Face student folder (default: a seeded tiny Llama)")
    p.add_argument("--sequences", type=int, default=32, help="synthetic traces")
    p.add_argument("--cot", type=int, nargs=2, default=(1400, 2000), help="synthetic CoT length range")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per fraction (the fastest counts)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    p.add_argument("--child", type=float, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_fraction(args: argparse.Namespace, fraction: float) -> dict[str, Any]:
    """One fraction in this process: warm-up step, baseline, timed epochs."""
    import _kd_bench as kb

    from raykd.kd import batching, step
    from raykd.kd.memory import PeakMemory
    from raykd.kd.model import ModelShape

    dev = kb.device()
    kb.init(dev, args.threads)
    model = kb.load_model(args.student, vocab=args.vocab, hidden=args.hidden, layers=args.layers)
    shape = ModelShape.of(model)
    rows = kb.trace_rows(args.traces, args.sequences, args.vocab, args.k, tuple(args.cot), seed=0)
    examples = kb.examples(rows, fraction)
    k = examples[0].topk_ids.shape[1]
    engine = kb.engine(model, dev, args.micro_batch_size, args.accumulation)
    lengths = batching.example_lengths(examples)

    def batches(plan_step: list[list[int]]) -> list[batching.MicroBatch]:
        return [batching.collate([examples[i] for i in m], k) for m in plan_step]

    step.train_step(
        engine,
        batches(batching.plan_epoch(lengths, args.micro_batch_size, args.accumulation, 0, 0)[0]),
        dev,
        shape,
    )
    memory = PeakMemory(dev)
    memory.reset()
    times, sums = [], {}
    for epoch in range(1, args.epochs + 1):
        plan = batching.plan_epoch(lengths, args.micro_batch_size, args.accumulation, 0, epoch)
        start = time.perf_counter()
        for planned in plan:
            sums = _add(sums, step.train_step(engine, batches(planned), dev, shape))
        if dev.type == "cuda":
            import torch

            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - start)
    per_epoch = {
        key: sums.get(key, 0.0) / args.epochs for key in ("kept_tokens", "forward_tokens", "tokens", "flops")
    }
    return {
        "epoch_s": min(times),
        "epoch_s_all": times,
        "step_mem_bytes": memory.above_baseline(),
        "baseline_bytes": memory._base,
        "memory_method": memory.method,
        "steps_per_epoch": len(plan),
        "sequences": len(examples),
        **{f"{key}_per_epoch": value for key, value in per_epoch.items()},
        "mean_kept_length": float(sum(e.kept_tokens for e in examples) / len(examples)),
    }


def _add(total: dict[str, float], sums: dict[str, float]) -> dict[str, float]:
    return {key: total.get(key, 0.0) + value for key, value in sums.items()}


def _child_argv(args: argparse.Namespace, fraction: float, out: str) -> list[str]:
    argv = [sys.executable, __file__, "--out", out, "--child", str(fraction)]
    for name in (
        "traces",
        "student",
        "sequences",
        "vocab",
        "k",
        "hidden",
        "layers",
        "micro_batch_size",
        "accumulation",
        "epochs",
        "threads",
    ):
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return [*argv, "--cot", *map(str, args.cot)]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child is not None:
        Path(args.out).write_text(json.dumps(run_fraction(args, args.child)))
        return 0
    # glibc: big blocks always mmapped, so freed tensors leave the resident set at once (see the docstring)
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", ""),
    }
    if not env["DS_ACCELERATOR"]:
        env.pop("DS_ACCELERATOR")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fraction in sorted(FRACTIONS, reverse=True):
            out = str(Path(tmp) / f"{fraction}.json")
            print(f"[truncation] f = {fraction} ...", flush=True)
            subprocess.run(_child_argv(args, fraction, out), env=env, check=True)
            runs[fraction] = json.loads(Path(out).read_text())
            print(
                f"[truncation] f = {fraction}: epoch {runs[fraction]['epoch_s']:.2f} s, step memory "
                f"{runs[fraction]['step_mem_bytes'] / 2**20:.1f} MiB",
                flush=True,
            )
    full = runs[1.0]
    result: dict[str, Any] = {
        str(f): {
            "time_ratio": r["epoch_s"] / full["epoch_s"],
            "peak_mem_ratio": r["step_mem_bytes"] / full["step_mem_bytes"],
            **r,
        }
        for f, r in sorted(runs.items())
    }
    result["targets"] = {"0.5": {"time_ratio": "<= 0.55", "peak_mem_ratio": "<= 0.6"}}
    result["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "child")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                f: {k: round(v, 3) for k, v in result[f].items() if k.endswith("ratio")}
                for f in ("0.25", "0.5", "1.0")
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
