"""A training worker's running sums and the metrics reported from them, summed or maxed over all workers.

Every function here that reduces is a collective: all workers call it, in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raykd.kd.batching import PlanStats
from raykd.kd.examples import PrepStats
from raykd.segments import SEGMENT_NAMES


@dataclass
class Totals:
    """Running sums of the step sums (raykd.kd.step.SUM_KEYS) plus bookkeeping, kept in checkpoints."""

    run: dict[str, float] = field(default_factory=dict)  # the whole run
    epoch: dict[str, float] = field(default_factory=dict)  # the current epoch
    interval: dict[str, float] = field(default_factory=dict)  # since the last report
    wall_s: float = 0.0
    interval_s: float = 0.0
    skipped_steps: int = 0
    peak_mem_bytes: int = 0
    step_mem_bytes: int = 0

    def add(self, sums: dict[str, float], seconds: float) -> None:
        for bucket in (self.run, self.epoch, self.interval):
            for key, value in sums.items():
                bucket[key] = bucket.get(key, 0.0) + value
        self.wall_s += seconds
        self.interval_s += seconds
        self.skipped_steps += int(sums.get("step_tokens", 1) == 0)

    def record_memory(self, memory: Any) -> None:
        """The highest memory of any worker so far (memory: raykd.kd.memory.PeakMemory)."""
        peak, above = all_reduce([memory.peak(), memory.above_baseline()], "max")
        self.peak_mem_bytes = max(self.peak_mem_bytes, int(peak))
        self.step_mem_bytes = max(self.step_mem_bytes, int(above))


def means(sums: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Token-weighted means from summed (all-worker) values."""
    tokens, kd_tokens = sums.get("tokens", 0.0), sums.get("kd_tokens", 0.0)
    out = {
        f"{prefix}ce": sums.get("ce_sum", 0.0) / max(tokens, 1),
        f"{prefix}kd": sums.get("kd_sum", 0.0) / max(kd_tokens, 1),
        f"{prefix}loss": sums.get("loss_sum", 0.0) / max(tokens, 1),
        f"{prefix}topk_mass": sums.get("topk_mass_sum", 0.0) / max(kd_tokens, 1),
        # per position with a cached teacher row (those left with no entry included)
        f"{prefix}topk_dropped_mass": sums.get("topk_dropped_mass", 0.0)
        / max(kd_tokens + sums.get("topk_unshared_targets", 0.0), 1),
    }
    for name in SEGMENT_NAMES:
        n = sums.get(f"tokens_{name}", 0.0)
        out[f"{prefix}ce_{name}"] = sums.get(f"ce_{name}", 0.0) / max(n, 1)
        out[f"{prefix}kd_{name}"] = sums.get(f"kd_{name}", 0.0) / max(n, 1)
        out[f"{prefix}tokens_{name}"] = n
    return out


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Sum or max of a few numbers over all workers (float64 on CPU, via the process group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=backend_device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.cpu().tolist()


def reduce_sums(d: dict[str, float]) -> dict[str, float]:
    """Sum step sums over workers; a fixed key list, so workers that ran no step still match the others."""
    from raykd.kd.step import SUM_KEYS

    keys = [*SUM_KEYS, "step_tokens"]
    return dict(zip(keys, all_reduce([d.get(k, 0.0) for k in keys]), strict=True))


def interval_metrics(totals: Totals) -> dict[str, Any]:
    """What a report between steps says: the interval's means and rate, the run's counts so far. Starts the
    next interval."""
    interval, run = reduce_sums(totals.interval), reduce_sums(totals.run)
    seconds = max(all_reduce([totals.interval_s], "max")[0], 1e-9)
    totals.interval, totals.interval_s = {}, 0.0
    return {
        **means(interval),
        "step_supervised_tokens": interval.get("tokens", 0.0),
        "supervised_tokens": run.get("tokens", 0.0),
        "kept_tokens": run.get("kept_tokens", 0.0),
        "tokens_per_s": interval.get("forward_tokens", 0.0) / seconds,
        "flops": run.get("flops", 0.0),
        "peak_mem_bytes": totals.peak_mem_bytes,
        "wall_s": all_reduce([totals.wall_s], "max")[0],
    }


def final_metrics(totals: Totals, prep: PrepStats, plan: PlanStats) -> dict[str, Any]:
    """The run's totals over all workers (raykd.kd.trainer.FINAL_METRICS): last epoch's means, counts."""
    run, epoch = reduce_sums(totals.run), reduce_sums(totals.epoch)
    wall = all_reduce([totals.wall_s], "max")[0]
    names = sorted(prep.as_dict())
    traces = dict(zip(names, all_reduce([float(prep.as_dict()[k]) for k in names]), strict=True))
    counts = ("supervised_tokens", "kept_tokens", "forward_tokens", "padded_tokens", "sequences")
    return {
        **means(epoch),
        **{name: run.get("tokens" if name == "supervised_tokens" else name, 0.0) for name in counts},
        "tokens_per_s": run.get("forward_tokens", 0.0) / max(wall, 1e-9),
        "flops": run.get("flops", 0.0),
        "peak_mem_bytes": totals.peak_mem_bytes,
        "step_mem_bytes": totals.step_mem_bytes,
        "wall_s": wall,
        "dummy_micro_batches": run.get("dummy_micro_batches", 0.0),
        "topk_dropped_entries": run.get("topk_dropped_entries", 0.0),
        "topk_unshared_targets": run.get("topk_unshared_targets", 0.0),
        "oversized_sequences": all_reduce([plan.oversized_sequences])[0],
        "max_pass_tokens": all_reduce([plan.max_pass_tokens], "max")[0],
        "skipped_steps": all_reduce([totals.skipped_steps], "max")[0],
        "traces": traces["sequences"],
        "traces_trained": traces["kept_sequences"],
        "traces_unsupervised": traces["unsupervised_sequences"],
        "traces_budget_dropped": traces["budget_dropped"],
    }
