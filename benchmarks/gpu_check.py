"""Prepared GPU check: raykd's KD training step at real sizes on one GPU (torch, transformers, DeepSpeed).

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json      # one GPU, a few minutes
    python benchmarks/gpu_check.py --dry --out /tmp/gpu_check_dry.json          # CPU, tiny shapes (the test)

No Ray and no vLLM anywhere in its imports (neither fits on the device machine; the script checks
sys.modules at the end and records it). What it runs is raykd's own code, not a copy:
- the model: a Qwen3 (Qwen3ForCausalLM) with Qwen3-1.7B's shapes (vocabulary 151,936, hidden 2048, MLP 6144,
  16 query / 8 KV heads of 128, tied embeddings), random weights, bf16 from the start, --layers decoder
  layers (default 28, Qwen3-1.7B's own count);
- the engine: `raykd.kd.deepspeed_config.build_engine` (KDStudent under DeepSpeed, the spec's default
  ZeRO stage, bf16, torch AdamW) at world size 1 (NCCL), gradient checkpointing on;
- the data: one synthetic trace of --lengths tokens (raykd.kd.synthetic: prompt, chain of thought, answer,
  top-k 20 teacher rows, prompt rows too, so every kept token is supervised), cut by
  `raykd.kd.examples.prepare_examples` at f = 0.5 and 1.0 (lead span), padded by `raykd.kd.batching.collate`;
- the step: `raykd.kd.step.train_step`, as the Ray Train worker runs it (forward, backward, optimizer step).

Figures, per trace length and f: median step seconds over --steps timed steps (after --warmup steps, which
also allocate the optimizer state), peak GPU memory (torch.cuda.max_memory_allocated) absolute and above the
baseline held between steps (weights, gradients, optimizer state), and the f = 0.5 / f = 1.0 ratios of both.
Then the KD loss alone at the longest length: peak memory of forward + backward of
`raykd.kd.losses.chunked_kd_loss` (cached top-k teacher) against `raykd.kd.losses.token_losses` on the full
(tokens, 151,936) student logits (the naive softmax over the whole vocabulary), with the same inputs, and
both loss values (they must agree).

--dry: the same code on the CPU (gloo, bf16 where DeepSpeed's CPU accelerator takes it), with a tiny Qwen3
and short traces: it checks that the script runs, not any figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the device machine runs it from the carried tree, not an install

K = 20  # cached teacher top-k (the spec's default logprobs_k)
FRACTIONS = (0.5, 1.0)


@dataclass(frozen=True)
class Shapes:
    vocab: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int


QWEN3_1_7B = Shapes(
    vocab=151_936, hidden=2048, intermediate=6144, heads=16, kv_heads=8, head_dim=128, layers=28
)
TINY = Shapes(vocab=1024, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, layers=2)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--dry", action="store_true", help="CPU, tiny shapes: check the script, not the figures")
    p.add_argument("--layers", type=int, help="decoder layers (default: 28, Qwen3-1.7B; --dry: 2)")
    p.add_argument("--lengths", type=int, nargs="+", help="trace lengths (default 4096 8192; --dry 64 128)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per setting")
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    args = p.parse_args(argv)
    base = TINY if args.dry else QWEN3_1_7B
    args.shapes = Shapes(**{**vars(base), "layers": args.layers or base.layers})
    args.lengths = sorted(args.lengths or ([64, 128] if args.dry else [4096, 8192]))
    if args.dry:
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 1)
    return args


# ------------------------------------------------------------------------------------------ inputs


def qwen3(shapes: Shapes, device: Any) -> Any:
    """A randomly initialised Qwen3ForCausalLM in bf16, built on ``device`` (no CPU copy first)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        vocab_size=shapes.vocab,
        hidden_size=shapes.hidden,
        intermediate_size=shapes.intermediate,
        num_hidden_layers=shapes.layers,
        num_attention_heads=shapes.heads,
        num_key_value_heads=shapes.kv_heads,
        head_dim=shapes.head_dim,
        max_position_embeddings=40_960,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def trace_rows(length: int, vocab: int, seed: int) -> dict[str, list[Any]]:
    """One synthetic trace of exactly ``length`` tokens: 1/16 prompt, a long chain of thought, an answer."""
    from raykd.kd.synthetic import synthetic_rows

    prompt, answer = max(4, length // 16), max(2, length // 64)
    cot = length - prompt - answer - 3  # <think>, </think> and EOS
    rows = synthetic_rows(
        1, vocab=vocab, k=K, prompt_len=(prompt, prompt), cot_len=(cot, cot), answer_len=(answer, answer),
        seed=seed, prompt_logprobs=True,
    )  # fmt: skip
    assert len(rows["prompt_ids"][0]) + len(rows["completion_ids"][0]) == length
    return rows


def micro_batch(length: int, fraction: float, vocab: int) -> Any:
    from raykd.kd.batching import collate
    from raykd.kd.examples import TrialData, prepare_examples

    examples, _ = prepare_examples(trace_rows(length, vocab, seed=length), TrialData(fraction=fraction))
    return collate(examples, K)


# ------------------------------------------------------------------------------------------ the step


def build(args: argparse.Namespace, device: Any) -> tuple[Any, Any]:
    """The DeepSpeed engine over the student, as the worker builds it, and the model's FLOPs shape."""
    from raykd.kd.deepspeed_config import build_engine, ds_config
    from raykd.kd.model import ModelShape
    from raykd.spec import LossSpec, TrainingSpec

    model = qwen3(args.shapes, device)
    shape = ModelShape.of(model)
    training = TrainingSpec(batch_size=1, micro_batch_size=1)
    config = ds_config(training, world_size=1, bf16=True)
    return build_engine(model, LossSpec(), config, checkpointing=True), shape


def measure_steps(engine: Any, shape: Any, mb: Any, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    from raykd.kd.memory import PeakMemory, timed
    from raykd.kd.step import train_step

    def one() -> dict[str, float]:
        return train_step(engine, [mb], device, shape)

    for _ in range(args.warmup):
        one()
    memory = PeakMemory(device)
    memory.reset()
    seconds, sums = [], {}
    for _ in range(args.steps):
        sums, s = timed(one, device)
        seconds.append(s)
    out = {
        "step_s": round(statistics.median(seconds), 4),
        "step_s_all": [round(s, 4) for s in seconds],
        "peak_bytes": memory.peak(),
        "peak_above_baseline_bytes": memory.above_baseline(),
        "baseline_bytes": memory.peak() - memory.above_baseline(),
        "forward_tokens": int(sums["forward_tokens"]),
        "supervised_tokens": int(sums["tokens"]),
        "loss": sums["loss_sum"] / max(sums["tokens"], 1),
        # Model FLOPs (raykd.kd.model.ModelShape: 3x the forward); checkpointing's recomputed forward is
        # not counted, so this understates what the GPU does.
        "model_tflops_per_s": round(sums["flops"] / statistics.median(seconds) / 1e12, 2),
    }
    memory.close()
    return out


def train_steps(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    engine, shape = build(args, device)
    out: dict[str, Any] = {"student_params": shape.body_params + shape.vocab * shape.hidden}
    for length in args.lengths:
        by_f = {str(f): measure_steps(engine, shape, micro_batch(length, f, args.shapes.vocab), args, device)
                for f in FRACTIONS}  # fmt: skip
        half, full = by_f["0.5"], by_f["1.0"]
        by_f["step_time_ratio"] = round(half["step_s"] / full["step_s"], 3)
        by_f["peak_above_baseline_ratio"] = round(
            half["peak_above_baseline_bytes"] / max(full["peak_above_baseline_bytes"], 1), 3
        )
        out[str(length)] = by_f
        print(f"[gpu_check] {length} tokens: {json.dumps(by_f)}", flush=True)
    return out


# ------------------------------------------------------------------------------------------ the loss alone


def loss_memory(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """Peak memory of the KD loss's forward + backward, chunked (ours) vs full-vocabulary logits (naive)."""
    import torch

    from raykd.kd.losses import chunked_kd_loss, token_losses
    from raykd.kd.memory import PeakMemory
    from raykd.kd.teachers import TopKTeacher
    from raykd.spec import LossSpec

    tokens, vocab, d = args.lengths[-1], args.shapes.vocab, args.shapes.hidden
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(tokens, d, generator=gen).to(device, torch.bfloat16).requires_grad_()
    weight = (torch.randn(vocab, d, generator=gen) * d**-0.5).to(device, torch.bfloat16).requires_grad_()
    targets = torch.randint(vocab, (tokens,), generator=gen).to(device)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:K] for _ in range(8)]).repeat(tokens // 8 + 1, 1)
    logprobs = torch.log_softmax(torch.randn(tokens, K, generator=gen), -1) + torch.log(torch.tensor(0.9))
    teacher = TopKTeacher(ids[:tokens].to(device), logprobs.to(device))
    loss = LossSpec()

    def ours() -> torch.Tensor:
        return chunked_kd_loss(hidden, weight, targets, teacher, loss).loss_sum

    def naive() -> torch.Tensor:
        return token_losses(hidden @ weight.T, targets, teacher, loss).weighted_sum(loss.kd_weight)

    out: dict[str, Any] = {"tokens": tokens, "vocab": vocab, "hidden": d, "k": K}
    for name, fn in (("ours", ours), ("naive", naive)):
        hidden.grad = weight.grad = None
        memory = PeakMemory(device)
        memory.reset()
        value = fn()
        value.backward()
        out[f"{name}_peak_above_baseline_bytes"] = memory.above_baseline()
        out[f"{name}_loss_sum"] = float(value.detach())
        memory.close()
        del value
    out["peak_ratio"] = round(
        out["ours_peak_above_baseline_bytes"] / max(out["naive_peak_above_baseline_bytes"], 1), 4
    )
    out["loss_rel_diff"] = abs(out["ours_loss_sum"] - out["naive_loss_sum"]) / max(
        abs(out["naive_loss_sum"]), 1e-9
    )
    print(f"[gpu_check] KD loss at {tokens} tokens: {json.dumps(out)}", flush=True)
    return out


# ------------------------------------------------------------------------------------------ main


def environment(device: Any) -> dict[str, Any]:
    import deepspeed
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return env


def heavy_modules() -> list[str]:
    """Ray or vLLM modules this process loaded (must be none: neither exists on the device machine)."""
    return sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "vllm"))


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # A fixed mmap threshold lets freed CPU blocks leave the resident set at once (raykd.kd.memory).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    import torch

    from raykd.kd.deepspeed_config import init_single_process

    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --dry for the CPU check of the script itself")
    device = torch.device("cpu" if args.dry else "cuda:0")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_single_process("gloo" if args.dry else "nccl")
    torch.manual_seed(0)
    start = time.perf_counter()
    result: dict[str, Any] = {
        "dry": args.dry,
        "environment": environment(device),
        "shapes": vars(args.shapes),
    }
    result["kd_loss"] = loss_memory(args, device)
    result["train_step"] = train_steps(args, device)
    result["settings"] = {"lengths": args.lengths, "warmup": args.warmup, "steps": args.steps, "k": K,
                          "gradient_checkpointing": True, "dtype": "bfloat16", "world_size": 1}  # fmt: skip
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["ray_or_vllm_modules_loaded"] = heavy_modules()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[gpu_check] wrote {out} in {result['wall_s']} s", flush=True)
    return 1 if result["ray_or_vllm_modules_loaded"] else 0


if __name__ == "__main__":
    sys.exit(main())
