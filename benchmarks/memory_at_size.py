"""Peak memory of one KD training step with gradient checkpointing against without, same model, same batch.

    python benchmarks/memory_at_size.py --out benchmarks/results/memory_at_size.json  # CPU, 2 x 2048
    python benchmarks/memory_at_size.py --out /tmp/m.json --layers 12 --length 4096 --sequences 1

Writes {"checkpointing_peak_ratio": with / without, "loss_match": true, "peak_bytes": {...}, "loss": {...},
"step_s": {...}, "settings": {...}}. Target: checkpointing_peak_ratio <= 0.5 with the same loss (asserted:
the run fails if the losses differ by more than float tolerance).

Method. Each variant ("off", "on") runs in a fresh subprocess (this file with --variant), so that neither
inherits the other's allocator state: a seeded random Llama (`raykd.kd.synthetic.tiny_llama`, >= 8 layers),
`--sequences` synthetic traces of exactly `--length` tokens each, supervised on every segment, in one
micro-batch, through `raykd.kd.step.train_step` (the Ray worker's step) on a DeepSpeed engine at world size 1
(ZeRO-2; gloo and fp32 on CPU, NCCL and bf16 on GPU), checkpointing switched by
`raykd.kd.deepspeed_config.build_engine` as the worker does it. A warm-up step allocates the optimizer
state and thread pools; then the memory baseline is taken (`raykd.kd.memory.PeakMemory`: VmHWM after
clear_refs on CPU, with glibc's mmap threshold fixed so that freed tensors leave the resident set;
max_memory_allocated on GPU) and one step is measured.
Losses compared: the warm-up step's (same forward) and the measured step's (after one update, so it also
compares the gradients of the two variants).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("off", "on")
LOSS_RTOL = 1e-5  # recomputation runs the same kernels on the same inputs; fp32 sums may reorder slightly


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4, help="attention heads (head_dim = hidden / heads)")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--length", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--sequences", type=int, default=2, help="sequences in the micro-batch")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one measurement
    args = p.parse_args(argv)
    if args.layers < 1 or args.length < 16:
        p.error("--layers must be >= 1 and --length >= 16")
    return args


def _rows(args: argparse.Namespace) -> dict[str, Any]:
    """Traces of exactly `length` tokens: prompt 32, answer 16 (+ EOS), the rest chain of thought."""
    from raykd.kd import synthetic

    cot = args.length - 32 - 16 - 3  # <think>, </think>, EOS
    return synthetic.synthetic_rows(
        args.sequences,
        vocab=args.vocab,
        k=args.k,
        prompt_len=(32, 32),
        cot_len=(cot, cot),
        answer_len=(16, 16),
    )


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this process: warm-up step, baseline, one measured step."""
    import _kd_bench as kb

    from raykd.kd import batching, step
    from raykd.kd.deepspeed_config import build_engine, ds_config
    from raykd.kd.memory import PeakMemory, timed
    from raykd.kd.model import ModelShape
    from raykd.spec import LossSpec, TrainingSpec

    dev = kb.device()
    kb.init(dev, args.threads)
    model = kb.load_model(
        None,
        vocab=args.vocab,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        max_positions=max(4096, args.length),
    )
    shape = ModelShape.of(model)
    examples = kb.examples(_rows(args), 1.0)
    batch = [batching.collate(examples, args.k)]
    training = TrainingSpec(batch_size=args.sequences, micro_batch_size=args.sequences, zero_stage=2, lr=1e-4)
    config = ds_config(training, world_size=1, bf16=dev.type == "cuda")
    engine = build_engine(model.to(dev), LossSpec(), config, checkpointing=args.variant == "on")
    warm = step.train_step(engine, batch, dev, shape)
    memory = PeakMemory(dev)
    memory.reset()
    sums, seconds = timed(lambda: step.train_step(engine, batch, dev, shape), dev)
    return {
        "variant": args.variant,
        "peak_bytes": memory.above_baseline(),
        "baseline_bytes": memory._base,
        "method": memory.method,
        "step_s": seconds,
        "loss_warmup": warm["loss_sum"] / warm["tokens"],
        "loss": sums["loss_sum"] / sums["tokens"],
        "forward_tokens": sums["forward_tokens"],
        "params": kb.params(model),
    }


def _run_variant(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "variant.json"
        argv = [sys.executable, __file__, "--out", str(out), "--variant", variant]
        for name in ("layers", "hidden", "heads", "vocab", "length", "sequences", "k", "threads"):
            argv += [f"--{name}", str(getattr(args, name))]
        # glibc: big blocks always mmapped, so freed tensors leave the resident set at once (docstring)
        env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
        subprocess.run(argv, env=env, check=True)
        result = json.loads(out.read_text())
    print(
        f"[memory_at_size] checkpointing {variant:3s}: step peak {result['peak_bytes'] / 2**20:8.1f} MiB, "
        f"{result['step_s']:.1f} s, loss {result['loss']:.6f}",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.variant is not None:
        Path(args.out).write_text(json.dumps(measure(args)))
        return 0
    runs = {v: _run_variant(args, v) for v in VARIANTS}
    off, on = runs["off"], runs["on"]
    for key in ("loss_warmup", "loss"):
        if not math.isclose(off[key], on[key], rel_tol=LOSS_RTOL):
            raise SystemExit(f"{key} differs with checkpointing: {off[key]!r} vs {on[key]!r}")
    result = {
        "checkpointing_peak_ratio": on["peak_bytes"] / off["peak_bytes"],
        "target": "<= 0.5",
        "loss_match": True,
        "loss_rtol": LOSS_RTOL,
        "step_time_ratio": on["step_s"] / off["step_s"],
        "peak_bytes": {v: r["peak_bytes"] for v, r in runs.items()},
        "baseline_bytes": {v: r["baseline_bytes"] for v, r in runs.items()},
        "loss": {v: r["loss"] for v, r in runs.items()},
        "loss_warmup": {v: r["loss_warmup"] for v, r in runs.items()},
        "step_s": {v: r["step_s"] for v, r in runs.items()},
        "method": sorted({r["method"] for r in runs.values()}),
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("out", "variant")},
            "params": off["params"],
            "forward_tokens": off["forward_tokens"],
            "zero_stage": 2,
            "device": "cuda" if "cuda" in off["method"] else "cpu",
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"checkpointing_peak_ratio {result['checkpointing_peak_ratio']:.3f} "
        f"(step time x{result['step_time_ratio']:.2f}, losses equal) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
