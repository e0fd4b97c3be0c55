"""The Ray Train worker: one DeepSpeed data-parallel rank of a KD trial (`train_func`, run by TorchTrainer).

Everything comes from the `config` dict (see `KDConfig`); everything goes out through `ray.train.report`.

Data. Each worker reads its shard (`ray.train.get_dataset_shard("train")`) once, truncating and labelling
each batch as it arrives (`raykd.kd.batching`), so it holds only the kept tokens and the teacher rows of the
supervised ones. The shard is sorted by (problem_id, sample_index), so the seeded per-epoch shuffle and the
length-grouped plan do not depend on the order Ray Data delivered the rows. Materialising beats streaming
here: traces are read once per trial and are small after truncation, length grouping needs the lengths, and
a resumed run can skip the steps already done exactly. Ray's split is even (`equal=True`); the trainer asks
for ordered, locality-free execution so that the split itself repeats on a restart (a digest of each shard's
keys is checked on resume and a changed shard is reported).

Steps. All workers take the same number of steps per epoch (the longest shard's; shorter shards run
zero-weight dummy micro-batches), because every step is a collective. See `raykd.kd.step` for the loss
normalisation.

Checkpoints. Every `checkpoint_every` steps each worker writes its part of a DeepSpeed checkpoint
(`engine.save_checkpoint`: model and, per rank, ZeRO optimizer partitions) to a local folder and reports it;
Ray Train merges the workers' folders into one checkpoint. Rank 0 adds `state.json` (step, epoch, position in
the epoch), every rank `rank<r>.json` (its running sums and a digest of its shard). On a restart
(FailureConfig), `ray.train.get_checkpoint()` gives the latest one back, the engine reloads it and the loop
skips the steps already done in that epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from raykd.kd.batching import TRAIN_COLUMNS, Example, PrepStats, TrialData

SEGMENT_NAMES = ("prompt", "cot", "answer")
STATE_FILE = "state.json"


@dataclass(frozen=True)
class KDConfig:
    """A trial's training settings: TrainingSpec and KDSpec fields, the grid point, models, resources."""

    student_dir: str  # the base student (a Hugging Face folder)
    student_out: str  # where the trained student is saved, in Hugging Face format
    fraction: float = 1.0
    segments: tuple[str, ...] = ("prompt", "cot", "answer")
    seed: int = 0
    truncation_policy: str = "lead_span"
    epochs: int = 2
    lr: float = 4e-6
    weight_decay: float = 0.0
    batch_size: int = 32
    micro_batch_size: int = 4
    micro_batch_tokens: int | None = None  # token budget of a forward pass (None: micro_batch_size only)
    gradient_checkpointing: bool | str = "auto"  # 'auto': on when training on GPUs
    zero_stage: int = 2
    random_label_mask: float = 0.0
    checkpoint_every: int = 100
    log_every: int = 10
    divergence: str = "forward_kl"
    kd_weight: float = 0.5
    temperature: float = 1.0
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    teacher_signal: str = "cached_topk"
    teacher_dir: str | None = None
    tokenizer_dir: str | None = None
    trust_remote_code: bool = False
    workers_per_trial: int = 1
    gpus_per_worker: int = 0
    cpus_per_worker: int = 1
    worker_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per worker
    tensorboard_dir: str | None = None
    grad_clip: float = 1.0
    loss_chunk_size: int = 1024
    max_steps: int | None = None  # stop early (smoke tests)
    crash_after_step: int | None = None  # tests: the last rank dies after this step, on a first attempt

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> KDConfig:
        """Unknown keys are errors; `policy` is accepted as an alias of `truncation_policy`."""
        raw = dict(raw)
        policy = raw.pop("policy", None)
        if policy is not None and raw.setdefault("truncation_policy", policy) != policy:
            raise ValueError(f"policy {policy!r} and truncation_policy {raw['truncation_policy']!r} disagree")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known keys: {sorted(known)}")
        raw["segments"] = tuple(raw.get("segments", cls.segments))
        return cls(**raw)

    @property
    def trial(self) -> TrialData:
        return TrialData(
            self.fraction, self.truncation_policy, self.segments, self.random_label_mask, self.seed
        )

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def checkpointing(self) -> bool:
        """Gradient checkpointing as run: 'auto' means on GPUs (activations dominate there), off on CPU."""
        if self.gradient_checkpointing == "auto":
            return self.use_gpu
        return bool(self.gradient_checkpointing)

    @property
    def step_sequences(self) -> int:
        """Sequences each worker takes per optimizer step (batch_size is summed over workers)."""
        return self.batch_size // self.workers_per_trial


# ------------------------------------------------------------------------------------------ totals


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


def means(sums: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Token-weighted means from summed (all-worker) values."""
    tokens, kd_tokens = sums.get("tokens", 0.0), sums.get("kd_tokens", 0.0)
    out = {
        f"{prefix}ce": sums.get("ce_sum", 0.0) / max(tokens, 1),
        f"{prefix}kd": sums.get("kd_sum", 0.0) / max(kd_tokens, 1),
        f"{prefix}loss": sums.get("loss_sum", 0.0) / max(tokens, 1),
        f"{prefix}topk_mass": sums.get("topk_mass_sum", 0.0) / max(kd_tokens, 1),
    }
    for name in SEGMENT_NAMES:
        n = sums.get(f"tokens_{name}", 0.0)
        out[f"{prefix}ce_{name}"] = sums.get(f"ce_{name}", 0.0) / max(n, 1)
        out[f"{prefix}kd_{name}"] = sums.get(f"kd_{name}", 0.0) / max(n, 1)
        out[f"{prefix}tokens_{name}"] = n
    return out


# ------------------------------------------------------------------------------------------ data


def load_shard(shard: Any, trial: TrialData, batch_size: int = 256) -> tuple[list[Example], PrepStats]:
    """Read, truncate and label a worker's shard (Ray DataIterator), sorted by key, budget control applied."""
    from raykd.kd import batching

    examples: list[Example] = []
    stats = PrepStats()
    for rows in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        part, part_stats = batching.prepare_examples(rows, trial)
        examples.extend(part)
        stats.add(part_stats)
    examples = batching.sort_by_key(examples)
    examples, dropped = batching.select_budget(examples, trial)
    stats.budget_dropped = dropped
    return examples, stats


def shard_digest(examples: list[Example]) -> str:
    return hashlib.sha256("\n".join(e.key for e in examples).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ collectives


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


# ------------------------------------------------------------------------------------------ the function


def train_func(config: dict[str, Any]) -> None:
    """Ray Train per-worker entry point (TorchTrainer(train_loop_per_worker=train_func))."""
    import ray.train

    _quiet_report_lines()
    cfg = KDConfig.from_dict(config)
    ctx = ray.train.get_context()
    run = _Run(cfg, ctx.get_world_rank(), ctx.get_world_size())
    run.setup(ray.train.get_dataset_shard("train"), ray.train.get_checkpoint())
    run.train()
    run.finish()


def _quiet_report_lines() -> None:
    """Ray 2.60's Train context logs every ray.train.report, whole metrics dict included, at INFO from each
    worker, through a logger named by its file path (``logging.getLogger(__file__)``), so RunConfig's
    LoggingConfig (which filters ``ray.train.*``) misses it. raykd's step lines say the same in one line."""
    import logging

    try:  # a private module: if a later Ray moves it, the lines just stay
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class _Run:
    """The state of one worker's run; methods in the order they happen."""

    def __init__(self, cfg: KDConfig, rank: int, world: int):
        import deepspeed
        import ray.train.torch
        import torch

        self.cfg, self.rank, self.world = cfg, rank, world
        self.device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not cfg.use_gpu:
            from raykd._compat import skip_deepspeed_shm_comm

            skip_deepspeed_shm_comm()
        deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")
        torch.manual_seed(cfg.seed)
        self.totals = Totals()
        self.global_step, self.start_epoch, self.start_step = 0, 0, 0
        self.resumed_from: int | None = None
        self.done = False
        self.writer: Any = None

    # -------------------------------------------------------------------------------------- setup

    def setup(self, shard: Any, checkpoint: Any) -> None:
        from raykd.kd import batching

        started = time.perf_counter()
        self.examples, self.prep = load_shard(shard, self.cfg.trial)
        counts = all_reduce([len(self.examples), self.prep.sequences])
        if counts[0] == 0:
            raise ValueError(
                f"no trace has a supervised token after truncation (f = {self.cfg.fraction}, policy "
                f"{self.cfg.truncation_policy}) and the segment mask {list(self.cfg.segments)} "
                f"({int(counts[1])} traces read); keep more of each trace or supervise other segments"
            )
        self.k = int(self.examples[0].topk_ids.shape[1]) if self.examples else 0
        self.k = int(all_reduce([self.k], "max")[0])
        if self.k == 0 and self.cfg.teacher_signal == "cached_topk":
            raise ValueError("the traces hold no cached top-k logprobs (k = 0); use teacher_signal: online")
        local = batching.steps_per_epoch(len(self.examples), self.cfg.step_sequences, 1)
        self.steps_per_epoch = int(all_reduce([local], "max")[0])
        self.plan_stats = batching.PlanStats()
        self._build_models()
        if checkpoint is not None:
            self._restore(checkpoint)
        self.setup_s = time.perf_counter() - started

    def _build_models(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from raykd.kd import step
        from raykd.kd.losses import KDLossConfig

        load = dict(trust_remote_code=self.cfg.trust_remote_code)
        # bf16 on GPU from the first byte: DeepSpeed's optimizer keeps the fp32 master copy (partitioned).
        dtype = torch.bfloat16 if self.cfg.use_gpu else torch.float32
        ds = step.ds_config(
            batch_size=self.cfg.batch_size,
            micro_batch_size=self.cfg.micro_batch_size,
            world_size=self.world,
            zero_stage=self.cfg.zero_stage,
            lr=self.cfg.lr,
            weight_decay=self.cfg.weight_decay,
            bf16=self.cfg.use_gpu,
            grad_clip=self.cfg.grad_clip,
            token_budget=self.cfg.micro_batch_tokens is not None,
        )
        self.teacher = self.teacher_shape = None
        teacher_model = None
        if self.cfg.teacher_signal == "online":  # loaded first, whole: outside the student's ZeRO-3 init
            teacher_model = AutoModelForCausalLM.from_pretrained(self.cfg.teacher_dir, dtype=dtype, **load)
            self.teacher = step.OnlineTeacher(teacher_model.to(self.device))
            self.teacher_shape = step.ModelShape.of(teacher_model)
        student = step.load_student(self.cfg.student_dir, dtype, ds, self.cfg.trust_remote_code)
        max_id = max((int(e.topk_ids.max()) for e in self.examples if e.topk_ids.size), default=-1)
        max_id = int(all_reduce([max_id], "max")[0])
        step.check_vocab(student, max_id if self.cfg.teacher_signal == "cached_topk" else None)
        self.shape = step.ModelShape.of(student)
        self.pad_id = student.config.pad_token_id if student.config.pad_token_id is not None else 0
        loss = KDLossConfig(
            divergence=self.cfg.divergence,  # type: ignore[arg-type]
            lam=self.cfg.kd_weight,
            temperature=self.cfg.temperature,
            beta=self.cfg.jsd_beta,
            skew_alpha=self.cfg.skew_alpha,
            chunk_size=self.cfg.loss_chunk_size,
        )
        self.engine = step.build_engine(student.to(self.device), loss, ds, self.cfg.checkpointing)

    def _restore(self, checkpoint: Any) -> None:
        with checkpoint.as_directory() as folder:
            state = json.loads((Path(folder) / STATE_FILE).read_text())
            if state.get("tag"):
                self.engine.load_checkpoint(folder, tag=state["tag"])
            own = json.loads((Path(folder) / f"rank{self.rank}.json").read_text())
            if own["digest"] != shard_digest(self.examples):
                print(
                    f"[raykd rank {self.rank}] warning: this worker's shard differs from the checkpointed "
                    "run's; the resumed epoch may repeat or skip some traces",
                    flush=True,
                )
        self.global_step = self.resumed_from = int(state["global_step"])
        self.start_epoch, self.start_step = int(state["epoch"]), int(state["step_in_epoch"])
        self.totals = Totals(**own["totals"])
        self.done = bool(state.get("done"))

    # -------------------------------------------------------------------------------------- training

    def train(self) -> None:
        from raykd.kd import step

        if self.done:
            return
        self.memory = step.PeakMemory(self.device)
        self.memory.reset()
        self._open_writer()
        total_steps = self.steps_per_epoch * self.cfg.epochs
        if self.cfg.max_steps is not None:
            total_steps = min(total_steps, self.cfg.max_steps)
        for epoch in range(self.start_epoch, self.cfg.epochs):
            plan = self._plan(epoch)
            first = self.start_step if epoch == self.start_epoch else 0
            if first == 0:
                self.totals.epoch = {}
            for i in range(first, self.steps_per_epoch):
                if self.global_step >= total_steps:
                    return
                self._one_step(plan[i])
                self._after_step(epoch, i + 1, total_steps)

    def _plan(self, epoch: int) -> list[list[list[int]]]:
        """This worker's steps of the epoch, every step padded with empty (dummy) micro-batches to the most
        micro-batches any worker runs in it, and to the longest shard's step count."""
        from raykd.kd import batching

        cfg, lengths = self.cfg, batching.example_lengths(self.examples)
        if cfg.micro_batch_tokens is None:
            accumulation = cfg.step_sequences // cfg.micro_batch_size
            plan = batching.plan_epoch(lengths, cfg.micro_batch_size, accumulation, cfg.seed, epoch)
        else:
            plan = batching.plan_epoch_tokens(
                lengths, cfg.step_sequences, cfg.micro_batch_size, cfg.micro_batch_tokens, cfg.seed, epoch
            )
        stats = batching.plan_stats(plan, lengths, cfg.micro_batch_tokens)
        self.plan_stats = batching.PlanStats(
            stats.oversized_sequences, max(stats.max_pass_tokens, self.plan_stats.max_pass_tokens)
        )
        plan = plan + [[] for _ in range(self.steps_per_epoch - len(plan))]
        counts = all_reduce([max(len(micros), 1) for micros in plan], "max")
        pad = [int(c) - len(micros) for micros, c in zip(plan, counts, strict=True)]
        return [micros + [[] for _ in range(n)] for micros, n in zip(plan, pad, strict=True)]

    def _one_step(self, micros: list[list[int]]) -> None:
        from raykd.kd import batching, step

        started = time.perf_counter()
        batches = [batching.collate([self.examples[i] for i in m], self.k, self.pad_id) for m in micros]
        sums = step.train_step(
            self.engine, batches, self.device, self.shape, self.teacher, self.teacher_shape
        )
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        self.totals.add(sums, time.perf_counter() - started)
        self.global_step += 1

    def _after_step(self, epoch: int, step_in_epoch: int, total_steps: int) -> None:
        last = self.global_step == total_steps
        save = self.global_step % self.cfg.checkpoint_every == 0 and not last
        if save or self.global_step % self.cfg.log_every == 0 or last:
            started = time.perf_counter()
            metrics = self._interval_metrics(epoch)
            if save:
                self._report_with_checkpoint(metrics, epoch, step_in_epoch)
            else:
                self._report(metrics)
            self.totals.wall_s += time.perf_counter() - started  # reports and checkpoints are training time
        crash = self.cfg.crash_after_step
        first_attempt = self.resumed_from is None
        if self.global_step == crash and first_attempt and self.rank == self.world - 1:
            # Ray Train registers a checkpoint once its controller has polled every worker's report (every
            # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s): die after a few polls, as a real failure would.
            poll = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0))
            print(f"[raykd rank {self.rank}] crash_after_step={crash}: dying to test recovery", flush=True)
            time.sleep(3 * poll)
            os._exit(1)

    # -------------------------------------------------------------------------------------- reporting

    def _interval_metrics(self, epoch: int) -> dict[str, Any]:
        interval = reduce_sums(self.totals.interval)
        run = reduce_sums(self.totals.run)
        seconds = max(all_reduce([self.totals.interval_s], "max")[0], 1e-9)
        self._update_memory()
        metrics = {
            "step": self.global_step,
            "epoch": epoch,
            **means(interval),
            "step_supervised_tokens": interval.get("tokens", 0.0),
            "supervised_tokens": run.get("tokens", 0.0),
            "kept_tokens": run.get("kept_tokens", 0.0),
            "tokens_per_s": interval.get("forward_tokens", 0.0) / seconds,
            "flops": run.get("flops", 0.0),
            "peak_mem_bytes": self.totals.peak_mem_bytes,
            "wall_s": all_reduce([self.totals.wall_s], "max")[0],
        }
        self._log(metrics)
        self.totals.interval, self.totals.interval_s = {}, 0.0
        return metrics

    def _update_memory(self) -> None:
        peak, above = all_reduce([self.memory.peak(), self.memory.above_baseline()], "max")
        self.totals.peak_mem_bytes = max(self.totals.peak_mem_bytes, int(peak))
        self.totals.step_mem_bytes = max(self.totals.step_mem_bytes, int(above))

    def _log(self, m: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        print(
            f"[raykd] step {m['step']} epoch {m['epoch']} | ce {m['ce']:.4f} kd {m['kd']:.4f} "
            f"loss {m['loss']:.4f} | supervised tokens {int(m['step_supervised_tokens'])} "
            f"| {m['tokens_per_s']:.0f} tokens/s",
            flush=True,
        )
        if self.writer is not None:
            for key, value in m.items():
                if isinstance(value, int | float) and key != "step":
                    self.writer.add_scalar(f"train/{key}", value, m["step"])
            self.writer.flush()

    def _open_writer(self) -> None:
        if self.rank == 0 and self.cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.cfg.tensorboard_dir)

    def _report(self, metrics: dict[str, Any]) -> None:
        import ray.train

        ray.train.report(metrics)

    def _report_with_checkpoint(self, metrics: dict[str, Any], epoch: int, step_in_epoch: int) -> None:
        import ray.train

        tag = f"step{self.global_step}"
        next_epoch, next_step = (
            (epoch, step_in_epoch) if step_in_epoch < self.steps_per_epoch else (epoch + 1, 0)
        )
        with tempfile.TemporaryDirectory(prefix="raykd-ckpt-") as folder:
            self.engine.save_checkpoint(folder, tag=tag)
            self._write_state(folder, tag, next_epoch, next_step, done=False)
            ray.train.report(
                metrics,
                checkpoint=_checkpoint(folder),
                checkpoint_dir_name=f"checkpoint_{self.global_step:07d}",
            )

    def _write_state(self, folder: str, tag: str | None, epoch: int, step_in_epoch: int, done: bool) -> None:
        # Each rank's own running sums and shard digest; rank 0 adds the shared position in the data.
        rank = {
            "digest": shard_digest(self.examples),
            "examples": len(self.examples),
            "totals": asdict(self.totals),
        }
        (Path(folder) / f"rank{self.rank}.json").write_text(json.dumps(rank))
        if self.rank != 0:
            return
        state = {
            "tag": tag,
            "global_step": self.global_step,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "done": done,
        }
        (Path(folder) / STATE_FILE).write_text(json.dumps(state))

    # -------------------------------------------------------------------------------------- the end

    def finish(self) -> None:
        """Save the student in Hugging Face format, then report the final metrics with a small checkpoint."""
        import ray.train

        started = time.perf_counter()
        if not self.done:
            save_student(self.engine, self.cfg, self.rank)
        self.save_s = time.perf_counter() - started
        final = self._final_metrics()
        if self.writer is not None:
            self.writer.close()
        with tempfile.TemporaryDirectory(prefix="raykd-final-") as folder:
            self.done = True
            self._write_state(folder, None, self.cfg.epochs, 0, done=True)
            ray.train.report(final, checkpoint=_checkpoint(folder), checkpoint_dir_name="checkpoint_final")

    def _final_metrics(self) -> dict[str, Any]:
        run, epoch = reduce_sums(self.totals.run), reduce_sums(self.totals.epoch)
        if hasattr(self, "memory"):
            self._update_memory()
            self.memory.close()
        wall = all_reduce([self.totals.wall_s], "max")[0]
        names = sorted(self.prep.as_dict())
        prep = dict(zip(names, all_reduce([float(self.prep.as_dict()[k]) for k in names]), strict=True))
        return {
            "step": self.global_step,
            "epochs": self.cfg.epochs,
            **means(epoch),
            "supervised_tokens": run.get("tokens", 0.0),
            "kept_tokens": run.get("kept_tokens", 0.0),
            "forward_tokens": run.get("forward_tokens", 0.0),
            "padded_tokens": run.get("padded_tokens", 0.0),
            "sequences": run.get("sequences", 0.0),
            "tokens_per_s": run.get("forward_tokens", 0.0) / max(wall, 1e-9),
            "flops": run.get("flops", 0.0),
            "peak_mem_bytes": self.totals.peak_mem_bytes,
            "step_mem_bytes": self.totals.step_mem_bytes,
            "wall_s": wall,
            "setup_s": self.setup_s,
            "save_s": self.save_s,
            "dummy_micro_batches": run.get("dummy_micro_batches", 0.0),
            "oversized_sequences": all_reduce([self.plan_stats.oversized_sequences])[0],
            "max_pass_tokens": all_reduce([self.plan_stats.max_pass_tokens], "max")[0],
            "gradient_checkpointing": int(self.cfg.checkpointing),
            "skipped_steps": all_reduce([self.totals.skipped_steps], "max")[0],
            "traces": prep["sequences"],
            "traces_trained": prep["kept_sequences"],
            "traces_unsupervised": prep["unsupervised_sequences"],
            "traces_budget_dropped": prep["budget_dropped"],
            "resumed_from_step": -1 if self.resumed_from is None else self.resumed_from,
            "node_id": _node_id(),
            "student_dir": self.cfg.student_out,
        }


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _checkpoint(folder: str) -> Any:
    from ray.train import Checkpoint

    return Checkpoint.from_directory(folder)


# ------------------------------------------------------------------------------------------ HF export


def save_student(engine: Any, cfg: KDConfig, rank: int) -> None:
    """Write the student as a Hugging Face folder (config, safetensors, the traces' tokenizer and template).

    A collective under ZeRO-3 (the partitioned weights are gathered to rank 0); rank 0 writes, atomically.
    """
    import torch

    if cfg.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # every rank must call it
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    # Keys are KDStudent's ("model.<hf key>"): strip the wrapper's prefix.
    state = {k.removeprefix("model."): v.detach().cpu().contiguous() for k, v in state.items()}
    out = Path(cfg.student_out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=_parent(out)))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the folder is meant to be served (vLLM) and shared
    try:
        model = engine.module.model
        dtype = next(iter(state.values())).dtype if state else torch.float32
        model.config.dtype = dtype
        model.save_pretrained(tmp, state_dict=state)
        _copy_side_files(cfg, tmp)
        for item in tmp.iterdir():
            item.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _parent(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent


def _copy_side_files(cfg: KDConfig, folder: Path) -> None:
    """The tokenizer and chat template the traces were made with (tokenizer_dir: the teacher's), and a
    generation_config.json that stops on the template's end-of-turn token and the base student's own EOS
    (raykd.chat), so vLLM and transformers generate in the format the student was trained on; the base's
    licence files come along."""
    from raykd import chat
    from raykd.traces.stages import load_tokenizer

    source = cfg.tokenizer_dir or cfg.teacher_dir or cfg.student_dir
    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    tokenizer.save_pretrained(folder)
    chat.write_generation_config(folder, tokenizer, cfg.student_dir)
    for item in Path(cfg.student_dir).glob("*"):
        if item.is_file() and item.name.upper().startswith(("LICENSE", "NOTICE")):
            shutil.copy2(item, folder / item.name)


__all__ = ["TRAIN_COLUMNS", "KDConfig", "means", "save_student", "train_func"]
