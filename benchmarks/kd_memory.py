"""Peak memory of one KD loss forward + backward: chunked top-k KD (ours) against the naive full-vocab loss.

    python benchmarks/kd_memory.py --out results/kd_memory.json                  # CPU, float32, 4096 x 151936
    python benchmarks/kd_memory.py --out results/kd_memory.json --device cuda    # on a GPU
    python benchmarks/kd_memory.py --out /tmp/kd.json --tokens 1024 --d 512      # smaller

Variants, each computing (1 - lam) * CE + lam * KD (forward KL, lam = 0.5) over `tokens` supervised positions
from the student's final hidden states (tokens, d) and lm_head (vocab, d), then backward to both:
    ours         `chunked_kd_loss` with the cached top-k teacher (k ids + logprobs per position), chunks of
                 `--chunk-size` positions (the default teacher signal).
    naive        student and teacher logits (tokens, vocab) materialised, log_softmax of both, F.kl_div,
                 CE as nll_loss of the same student log-probs (= F.cross_entropy), autograd. The teacher's
                 logits come from teacher hidden states and a teacher head, with no grad, as an online
                 teacher in a plain KD loop makes them.
    ours_online  `chunked_kd_loss` with the online teacher (`TeacherHead`): exact full-vocab KD, chunked.
Writes {"peak_mem_ratio": ours / naive, "peak_bytes": {...}, "settings": {...}, ...}. Target: ratio <= 0.25.

Method. Each variant runs in a fresh subprocess (this file with --variant), so one variant's freed
memory, allocator caches or thread pools cannot hide or inflate another's. The subprocess allocates the
inputs (for ours, the top-k teacher is computed from the teacher head 64 rows at a time, so that no large
transient lands in the baseline), runs the variant once on 8 tokens to load kernels and thread pools, then:
    CPU   resets the kernel's peak-RSS mark (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), takes the
          resident set size as the baseline, runs forward + backward and reads the new peak (VmHWM in
          /proc/self/status). Peak growth = VmHWM - baseline: every page the variant touched at its
          high-water mark, the weight and hidden-state gradients it leaves behind included, whichever
          allocator made it. torch's CPU allocator does not cache, and glibc runs with a fixed mmap threshold
          (MALLOC_MMAP_THRESHOLD_=65536) so that freed blocks leave the resident set at once. Where
          clear_refs cannot be written, the growth of getrusage's ru_maxrss is used (named in "method").
    CUDA  torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), less memory_allocated() then.
The naive variant needs 4-5 (tokens, vocab) float32 tensors at once (~11 GB at 4096 x 151936); the script
refuses to start it when /proc/meminfo's MemAvailable looks too small, rather than push the machine into
swap.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from raykd.kd.losses import chunked_kd_loss
from raykd.kd.teachers import TeacherHead, TopKTeacher
from raykd.spec import LossSpec

VARIANTS = ("ours", "naive", "ours_online")
LAM = 0.5


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="JSON file to write (required unless --variant)")
    parser.add_argument("--tokens", type=int, default=4096, help="supervised positions")
    parser.add_argument("--vocab", type=int, default=151_936, help="vocabulary size (Qwen3: 151936)")
    parser.add_argument("--d", type=int, default=1024, help="student (and teacher) hidden size")
    parser.add_argument("--k", type=int, default=20, help="cached teacher top-k")
    parser.add_argument("--chunk-size", type=int, default=1024, help="positions per chunk (ours)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + str(VARIANTS)
    )
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args(argv)
    if args.variant is None and args.out is None:
        parser.error("--out is required")
    return args


# ------------------------------------------------------------------------------------------- inputs


def _inputs(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Student hidden (tokens, d) and lm_head (vocab, d) needing grad, targets, teacher hidden and head."""
    g = torch.Generator(device=device).manual_seed(0)
    t, v, d = args.tokens, args.vocab, args.d
    weight = (torch.randn(v, d, generator=g, device=device) / math.sqrt(d)).requires_grad_(True)
    hidden = torch.randn(t, d, generator=g, device=device).requires_grad_(True)
    teacher_hidden = torch.randn(t, d, generator=g, device=device) * 3  # peakier than the student
    teacher_weight = torch.randn(v, d, generator=g, device=device) / math.sqrt(d)
    targets = torch.randint(0, v, (t,), generator=g, device=device)
    return {
        "hidden": hidden,
        "weight": weight,
        "targets": targets,
        "teacher": TeacherHead(teacher_hidden, teacher_weight),
    }


def _topk_teacher(teacher: TeacherHead, k: int, rows: int = 64) -> TopKTeacher:
    """The teacher's top-k log-probs, a few rows at a time: no large transient precedes the baseline."""
    ids, logprobs = [], []
    for start in range(0, len(teacher), rows):
        top = teacher.rows(start, start + rows).full_logits().log_softmax(-1).topk(k, -1)
        ids.append(top.indices)
        logprobs.append(top.values)
    return TopKTeacher(torch.cat(ids), torch.cat(logprobs))


# ------------------------------------------------------------------------------------------ variants


def _naive(hidden: Tensor, weight: Tensor, targets: Tensor, teacher: TeacherHead) -> Tensor:
    """Full-vocab KD as a plain loop writes it: (tokens, vocab) logits of both models, kl_div + CE."""
    with torch.no_grad():
        teacher_logprobs = F.log_softmax(teacher.hidden @ teacher.weight.T, -1)
    # One log_softmax serves CE (nll of the log-probs = F.cross_entropy) and KD, and the raw student logits
    # are not kept: a careful full-vocab loop, not a strawman.
    student_logprobs = F.log_softmax(hidden @ weight.T, -1)
    kd = F.kl_div(student_logprobs, teacher_logprobs, log_target=True, reduction="sum")
    ce = F.nll_loss(student_logprobs, targets, reduction="sum")
    return ((1 - LAM) * ce + LAM * kd) / hidden.shape[0]


def _runner(variant: str, inputs: dict[str, Any], args: argparse.Namespace) -> Callable[[int], Tensor]:
    """A function of the number of tokens to use that runs the variant's forward and returns its loss."""
    config, chunk = LossSpec(kd_weight=LAM), args.chunk_size
    hidden, weight, targets, head = inputs["hidden"], inputs["weight"], inputs["targets"], inputs["teacher"]
    if variant == "naive":
        return lambda n: _naive(hidden[:n], weight, targets[:n], head.rows(0, n))
    if variant == "ours_online":
        return lambda n: chunked_kd_loss(
            hidden[:n], weight, targets[:n], head.rows(0, n), config, chunk_size=chunk
        ).mean_loss()
    topk = _topk_teacher(head, args.k)
    inputs["topk_mass"] = float(topk.logprobs.exp().sum(-1).mean())
    inputs["teacher"] = None  # ours needs only the cache: the teacher head is not part of its inputs
    return lambda n: chunked_kd_loss(
        hidden[:n], weight, targets[:n], topk.rows(0, n), config, chunk_size=chunk
    ).mean_loss()


# --------------------------------------------------------------------------------------- measurement


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class _PeakMeter:
    """Peak memory growth of the block between start() and stop(), in bytes (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.method = device, ""

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base, self.method = torch.cuda.memory_allocated(), "torch.cuda.max_memory_allocated"
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.base, self.method = _status_kb("VmRSS") * 1024, "VmHWM after clear_refs=5"
        except OSError:
            self.base, self.method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        if self.method == "ru_maxrss":
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base
        return _status_kb("VmHWM") * 1024 - self.base


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this process: peak growth of one forward + backward, in bytes."""
    device = torch.device(args.device)
    torch.set_grad_enabled(True)
    inputs = _inputs(args, device)
    run = _runner(args.variant, inputs, args)
    run(8).backward()  # warm-up: kernels, thread pools
    inputs["hidden"].grad = inputs["weight"].grad = None
    meter = _PeakMeter(device)
    meter.start()
    began = time.perf_counter()
    loss = run(args.tokens)
    loss.backward()
    peak = meter.stop()
    return {
        "variant": args.variant,
        "peak_bytes": peak,
        "seconds": round(time.perf_counter() - began, 2),
        "loss": float(loss),
        "method": meter.method,
        "topk_mass": inputs.get("topk_mass"),
    }


# ------------------------------------------------------------------------------------------- driver


def _available_bytes() -> int | None:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _check_room(args: argparse.Namespace) -> None:
    """Refuse the naive CPU run where its ~5 (tokens, vocab) float32 tensors would not fit comfortably."""
    need = 6 * args.tokens * args.vocab * 4 + 3 * args.vocab * args.d * 4
    available = _available_bytes()
    if args.device == "cpu" and available is not None and need > 0.9 * available:
        raise SystemExit(
            f"naive variant needs about {need / 2**30:.1f} GiB, only {available / 2**30:.1f} GiB available;"
            " use fewer --tokens or drop it from --variants"
        )


def _run_variant(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    if variant == "naive":
        _check_room(args)
    cmd = [sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens), "--vocab",
           str(args.vocab), "--d", str(args.d), "--k", str(args.k), "--chunk-size", str(args.chunk_size),
           "--device", args.device]  # fmt: skip
    # A fixed mmap threshold makes glibc return every freed block >= 64 KiB to the kernel at once; its default
    # dynamic threshold would keep freed blocks of up to 32 MiB resident and blur the RSS peaks.
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"{variant:12s} peak {result['peak_bytes'] / 2**30:6.2f} GiB  {result['seconds']:6.1f} s", flush=True
    )
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.variant is not None:
        print(json.dumps(measure(args)))
        return 0
    results = {v: _run_variant(args, v) for v in args.variants.split(",")}
    peaks = {v: r["peak_bytes"] for v, r in results.items()}
    report: dict[str, Any] = {
        "peak_mem_ratio": peaks["ours"] / peaks["naive"] if {"ours", "naive"} <= peaks.keys() else None,
        "target": "<= 0.25",
        "peak_bytes": peaks,
        "seconds": {v: r["seconds"] for v, r in results.items()},
        "loss": {v: r["loss"] for v, r in results.items()},
        "online_peak_mem_ratio": peaks["ours_online"] / peaks["naive"]
        if {"ours_online", "naive"} <= peaks.keys()
        else None,
        "teacher_topk_mass_synthetic": results.get("ours", {}).get("topk_mass"),
        "method": sorted({r["method"] for r in results.values()}),
        "settings": {
            "tokens": args.tokens,
            "vocab": args.vocab,
            "d": args.d,
            "k": args.k,
            "chunk_size": args.chunk_size,
            "device": args.device,
            "dtype": "float32",
            "divergence": "forward_kl",
            "lam": LAM,
            "logits_tensor_bytes": args.tokens * args.vocab * 4,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"peak_mem_ratio {report['peak_mem_ratio']}  -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
