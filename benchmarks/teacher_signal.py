"""Step time of KD training with the cached top-k teacher against an online teacher 4x+ the student's size.

    python benchmarks/teacher_signal.py --out benchmarks/results/teacher_signal.json  # CPU fp32 / GPU bf16
    python benchmarks/teacher_signal.py --out /tmp/t.json --traces DIR --student DIR --teacher DIR

Writes {"step_time_ratio": cached / online, ...}: the median wall time of a training step that reads the
teacher's top-k logprobs cached with the traces, over that of a step that runs a frozen teacher forward on the
same micro-batches (exact full-vocabulary KD). Target: <= 0.5.

Method. One process, the same traces (seeded synthetic ones with 300-500-token chains of thought, or the
Parquet folder given), student and `raykd.kd.step.train_step` (the Ray worker's step) on two DeepSpeed engines
(world size 1, ZeRO-2) from the same initial weights; the online one also holds the teacher (a seeded Llama
with `--teacher-scale` times the student's parameters, or the folder given). After one warm-up step each,
steps alternate between the two (cached, online, cached, ...) over the same planned micro-batches, so that a
busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _kd_bench as kb
import torch

from raykd.kd import batching, step
from raykd.kd.model import ModelShape, OnlineTeacher


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--traces", help="a trace Parquet folder (default: synthetic traces)")
    p.add_argument("--student", help="a Hugging Face student folder (default: a seeded tiny Llama)")
    p.add_argument(
        "--teacher", help="a Hugging Face teacher folder (default: a seeded Llama, see --teacher-*)"
    )
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--cot", type=int, nargs=2, default=(300, 500))
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--teacher-hidden", type=int, default=256)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--steps", type=int, default=16, help="timed steps per teacher signal")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    return p.parse_args(argv)


def _time_step(
    engine: Any,
    micros: list[batching.MicroBatch],
    dev: torch.device,
    shape: ModelShape,
    teacher: OnlineTeacher | None = None,
    teacher_shape: ModelShape | None = None,
) -> float:
    start = time.perf_counter()
    step.train_step(engine, micros, dev, shape, teacher, teacher_shape)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    dev = kb.device()
    kb.init(dev, args.threads)
    student = kb.load_model(args.student, vocab=args.vocab, hidden=args.hidden, layers=args.layers)
    teacher_model = kb.load_model(
        args.teacher,
        vocab=args.vocab,
        hidden=args.teacher_hidden,
        layers=args.teacher_layers,
        heads=max(args.teacher_hidden // 64, 1),
        seed=1,
    )
    scale = kb.params(teacher_model) / kb.params(student)
    if scale < 4:
        raise SystemExit(f"the teacher has {scale:.1f}x the student's parameters; this benchmark wants >= 4x")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    teacher = OnlineTeacher(teacher_model.to(dev, dtype))
    shapes = ModelShape.of(student), ModelShape.of(teacher_model)
    rows = kb.trace_rows(args.traces, args.sequences, args.vocab, args.k, tuple(args.cot), seed=0)
    examples = kb.examples(rows, 1.0)
    k = examples[0].topk_ids.shape[1]
    cached = kb.engine(copy.deepcopy(student), dev, args.micro_batch_size, args.accumulation)
    online = kb.engine(student, dev, args.micro_batch_size, args.accumulation)
    lengths = batching.example_lengths(examples)
    plan = [
        s
        for e in range(100)
        for s in batching.plan_epoch(lengths, args.micro_batch_size, args.accumulation, 0, e)
    ][: args.steps + 1]
    times: dict[str, list[float]] = {"cached": [], "online": []}
    for i, planned in enumerate(plan):
        micros = [batching.collate([examples[j] for j in m], k) for m in planned]
        t_cached = _time_step(cached, micros, dev, shapes[0])
        t_online = _time_step(online, micros, dev, shapes[0], teacher, shapes[1])
        if i > 0:  # the first step of each warms up kernels, allocator and optimizer state
            times["cached"].append(t_cached)
            times["online"].append(t_online)
        print(f"[teacher_signal] step {i}: cached {t_cached:.3f} s, online {t_online:.3f} s", flush=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "step_time_ratio": median["cached"] / median["online"],
        "target": "<= 0.5",
        "step_s": median,
        "step_s_all": times,
        "teacher_params": kb.params(teacher_model),
        "student_params": kb.params(student),
        "teacher_scale": scale,
        "mean_sequence_tokens": float(lengths.mean()),
        "device": str(dev),
        "settings": {key: value for key, value in vars(args).items() if key != "out"},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"step_time_ratio": round(result["step_time_ratio"], 3), "step_s": median}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
