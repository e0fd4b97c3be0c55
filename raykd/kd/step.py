"""One optimizer step of KD training on a DeepSpeed engine, with no Ray in sight.

The Ray Train worker (`raykd.kd.worker`) and the benchmarks (`benchmarks/truncation.py`,
`benchmarks/teacher_signal.py`) run the same `train_step`.

Compute follows the kept tokens: the student's decoder runs on right-padded micro-batches of truncated
sequences (no attention mask: causal attention never lets a real token see a later pad), its final hidden
states are gathered at the supervised positions only, and `raykd.kd.losses.chunked_kd_loss` projects them on
the lm_head and takes CE + KD one chunk of positions at a time. Nothing of shape (batch, length, vocab)
exists, for the student or the teacher.

Loss normalisation: every supervised token of an optimizer step weighs the same, whatever micro-batch or
worker it lands in. Each micro-batch's loss is its *sum* over tokens divided by the step's total supervised
tokens N (all micro-batches of all workers, one all-reduce before the first forward). A per-micro-batch mean
would give the tokens of short (truncated) micro-batches more weight than those of long ones, and would change
with the micro-batch size and the number of workers. DeepSpeed averages gradients over the W data-parallel
workers and, by default, divides the loss by the accumulation steps; we pass `scale_wrt_gas=False` and
multiply by W, so the gradient is exactly d(sum over the step's tokens)/N.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from raykd.kd.batching import MicroBatch
from raykd.kd.model import ModelShape, OnlineTeacher
from raykd.segments import SEGMENT_NAMES

# Names of the sums a step accumulates; the worker all-reduces them as one vector.
SUM_KEYS = (
    "loss_sum",
    "ce_sum",
    "kd_sum",
    "topk_mass_sum",
    "tokens",
    "kd_tokens",
    *(f"{kind}_{name}" for kind in ("ce", "kd", "tokens") for name in SEGMENT_NAMES),
    "forward_tokens",
    "kept_tokens",
    "padded_tokens",
    "sequences",
    "dummy_micro_batches",
    "flops",
    # The cached teacher's top-k entries past the student's rows (a padded teacher), dropped by the loss: how
    # many, the teacher's mass on them, and positions left with none (CE only). KDStudent's last output.
    "topk_dropped_entries",
    "topk_dropped_mass",
    "topk_unshared_targets",
)


def to_device(mb: MicroBatch, device: torch.device) -> dict[str, Tensor]:
    arrays = {
        "input_ids": mb.input_ids,
        "flat_pos": mb.flat_pos,
        "target_ids": mb.target_ids,
        "segment": mb.segment,
        "topk_ids": mb.topk_ids,
        "topk_logprobs": mb.topk_logprobs,
        "has_teacher": mb.has_teacher,
    }
    return {
        k: torch.from_numpy(np.ascontiguousarray(v)).to(device, non_blocking=True) for k, v in arrays.items()
    }


def _all_reduce_sum(x: Tensor) -> Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def train_step(
    engine: Any,
    micro_batches: Sequence[MicroBatch],
    device: torch.device,
    student: ModelShape,
    teacher: OnlineTeacher | None = None,
    teacher_shape: ModelShape | None = None,
    all_reduce: Callable[[Tensor], Tensor] = _all_reduce_sum,
) -> dict[str, float]:
    """One optimizer step over this worker's micro-batches, however many (the last one is the boundary).

    Every worker must call it with as many micro-batches (dummies for missing data): gradient reductions
    are collectives. Returns this worker's sums (SUM_KEYS) plus 'step_tokens', the step's supervised tokens
    over all workers. A step with no supervised token on any worker runs nothing and leaves the weights and
    optimizer state as they were.
    """
    if not micro_batches:
        raise ValueError("a step needs at least one micro-batch (a dummy where this worker has no data)")
    local = torch.tensor([float(mb.n_targets) for mb in micro_batches]).sum().reshape(1)
    total = float(all_reduce(local.to(device))[0])
    sums = dict.fromkeys(SUM_KEYS, 0.0)
    sums["step_tokens"] = total
    if total == 0:
        return sums
    world = engine.dp_world_size if hasattr(engine, "dp_world_size") else 1
    for i, mb in enumerate(micro_batches):
        # The step's micro-batch count varies with a token budget: the engine's fixed accumulation count
        # must not decide where the optimizer steps.
        engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
        batch = to_device(mb, device)
        if teacher is not None:
            batch["teacher_hidden"] = teacher.hidden(batch["input_ids"], batch["flat_pos"])
            batch["teacher_weight"] = teacher.weight
        out = engine(**batch)
        engine.backward(out[0] * (mb.weight * world / total), scale_wrt_gas=False)
        engine.step()
        _accumulate(sums, out, mb, student, teacher_shape if teacher is not None else None)
    return sums


def _accumulate(
    sums: dict[str, float],
    out: tuple[Tensor, ...],
    mb: MicroBatch,
    student: ModelShape,
    teacher: ModelShape | None,
) -> None:
    if mb.weight == 0:
        sums["dummy_micro_batches"] += 1
        return
    loss, ce, kd, mass, kd_tokens, seg_ce, seg_kd, seg_tokens, dropped = (
        t.detach().float().cpu() for t in out
    )
    for key, value in (
        ("loss_sum", loss),
        ("ce_sum", ce),
        ("kd_sum", kd),
        ("topk_mass_sum", mass),
        ("kd_tokens", kd_tokens),
    ):
        sums[key] += float(value)
    for i, name in enumerate(SEGMENT_NAMES):
        sums[f"ce_{name}"] += float(seg_ce[i])
        sums[f"kd_{name}"] += float(seg_kd[i])
        sums[f"tokens_{name}"] += float(seg_tokens[i])
    for i, key in enumerate(("topk_dropped_entries", "topk_dropped_mass", "topk_unshared_targets")):
        sums[key] += float(dropped[i])
    sums["tokens"] += mb.n_targets
    sums["forward_tokens"] += mb.forward_tokens
    sums["kept_tokens"] += mb.kept_tokens
    sums["padded_tokens"] += mb.input_ids.size
    sums["sequences"] += len(mb.lengths)
    args = (mb.forward_tokens, mb.n_targets, mb.sq_len_sum)
    sums["flops"] += 3 * student.forward_flops(*args) + (teacher.forward_flops(*args) if teacher else 0.0)
