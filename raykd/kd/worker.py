"""The Ray Train worker: one DeepSpeed data-parallel rank of a KD trial (`train_func`, run by TorchTrainer).

Everything comes from the `config` dict (a `raykd.plan.TrialConfig` dump, validated once here); everything
goes out through `ray.train.report`.

Data. Each worker reads its shard (`ray.train.get_dataset_shard("train")`) once, truncating and labelling
each batch as it arrives (`raykd.kd.examples`), so it holds only the kept tokens and the teacher rows of the
supervised ones. The shard is sorted by (problem_id, sample_index), so the seeded per-epoch shuffle and the
length-grouped plan (`raykd.kd.batching`) do not depend on the order Ray Data delivered the rows.
Materialising beats streaming here: traces are read once per trial and are small after truncation, length
grouping needs the lengths, and a resumed run can skip the steps already done exactly. Ray's split is even
(`equal=True`); the trainer asks for ordered, locality-free execution so that the split itself repeats on a
restart (a digest of each shard's keys is checked on resume and a changed shard is reported).

Steps. All workers take the same number of steps per epoch (the longest shard's; shorter shards run
zero-weight dummy micro-batches), because every step is a collective. See `raykd.kd.step` for the loss
normalisation, `raykd.kd.checkpoint` for checkpoints and resume, `raykd.kd.metrics` for what is reported.
"""

from __future__ import annotations

import time
from typing import Any

from raykd.kd import batching, checkpoint
from raykd.kd.checkpoint import Position, RankState
from raykd.kd.examples import TrialData, load_shard, shard_digest
from raykd.kd.metrics import Totals, all_reduce, final_metrics, interval_metrics
from raykd.plan import TrialConfig


def train_func(config: dict[str, Any]) -> None:
    """Ray Train per-worker entry point (TorchTrainer(train_loop_per_worker=train_func))."""
    entered = time.time()
    import ray.train

    from raykd._compat import quiet_ray_train_report_logger

    quiet_ray_train_report_logger()
    cfg = TrialConfig.model_validate(config)
    ctx = ray.train.get_context()
    run = _Run(cfg, ctx.get_world_rank(), ctx.get_world_size(), entered)
    run.setup(ray.train.get_dataset_shard("train"), ray.train.get_checkpoint())
    run.train()
    run.finish()


class _Run:
    """The state of one worker's run; methods in the order they happen."""

    def __init__(self, cfg: TrialConfig, rank: int, world: int, entered: float):
        # Wall-clock times (time.time(), comparable across this host's processes) of this attempt's phases,
        # reported as at_<phase>: the trial's record turns them into its timeline (raykd.trial).
        self.at = {"entered": entered}
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
        self.at["distributed"] = time.time()
        self.totals, self.start, self.global_step = Totals(), Position(), 0
        self.resumed_from: int | None = None  # the checkpoint step this attempt started from
        self.writer: Any = None

    # -------------------------------------------------------------------------------------- setup

    def setup(self, shard: Any, saved: Any) -> None:
        started = time.perf_counter()
        self.examples, self.prep = load_shard(shard, TrialData.of(self.cfg))
        self.at["shard_read"] = time.time()
        self._check_examples()
        local = batching.steps_per_epoch(len(self.examples), self.cfg.step_sequences, 1)
        self.steps_per_epoch = int(all_reduce([local], "max")[0])
        self.plan_stats = batching.PlanStats()
        self._build_models()
        if saved is not None:
            digest = shard_digest(self.examples)
            self.start, self.totals = checkpoint.restore(saved, self.engine, self.rank, digest)
            self.global_step = self.resumed_from = self.start.global_step
        self.setup_s = time.perf_counter() - started
        self.at["models_built"] = time.time()

    def _check_examples(self) -> None:
        cfg = self.cfg
        counts = all_reduce([len(self.examples), self.prep.sequences])
        if counts[0] == 0:
            raise ValueError(
                f"no trace has a supervised token after truncation (f = {cfg.fraction}, policy "
                f"{cfg.training.truncation_policy}) and the segment mask {list(cfg.segments)} "
                f"({int(counts[1])} traces read); keep more of each trace or supervise other segments"
            )
        k = int(self.examples[0].topk_ids.shape[1]) if self.examples else 0
        self.k = int(all_reduce([k], "max")[0])
        if self.k == 0 and cfg.training.kd.teacher_signal == "cached_topk":
            raise ValueError("the traces hold no cached top-k logprobs (k = 0); use teacher_signal: online")

    def _build_models(self) -> None:
        import torch

        from raykd.kd.deepspeed_config import build_engine, ds_config
        from raykd.kd.model import ModelShape, check_vocab, load_student, load_teacher

        cfg, models = self.cfg, self.cfg.models
        # bf16 on GPU from the first byte: DeepSpeed's optimizer keeps the fp32 master copy (partitioned).
        dtype = torch.bfloat16 if cfg.use_gpu else torch.float32
        ds = ds_config(cfg.training, self.world, bf16=cfg.use_gpu, grad_clip=cfg.run.grad_clip)
        self.teacher = self.teacher_shape = None
        cached = cfg.training.kd.teacher_signal == "cached_topk"
        if not cached:
            self.teacher = load_teacher(models.teacher_dir, dtype, self.device, models.trust_remote_code)
            self.teacher_shape = ModelShape.of(self.teacher.model)
        student = load_student(models.student_dir, dtype, ds, models.trust_remote_code)
        max_id = max(
            (max(int(e.input_ids.max(initial=0)), int(e.target_ids.max())) for e in self.examples), default=-1
        )
        check_vocab(student, int(all_reduce([max_id], "max")[0]))
        self.shape = ModelShape.of(student)
        self.pad_id = student.config.pad_token_id if student.config.pad_token_id is not None else 0
        self.engine = build_engine(
            student.to(self.device), cfg.training.kd, ds, cfg.checkpointing, cfg.run.loss_chunk_size
        )

    # -------------------------------------------------------------------------------------- training

    def train(self) -> None:
        from raykd.kd.memory import PeakMemory

        if self.start.done:
            return
        self.memory = PeakMemory(self.device)
        self.memory.reset()
        self._open_writer()
        epochs, start = self.cfg.training.epochs, self.start
        total_steps = self.steps_per_epoch * epochs
        if self.cfg.run.max_steps is not None:
            total_steps = min(total_steps, self.cfg.run.max_steps)
        for epoch in range(start.epoch, epochs):
            plan = self._plan(epoch)
            first = start.step_in_epoch if epoch == start.epoch else 0
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
        cfg, training, lengths = self.cfg, self.cfg.training, batching.example_lengths(self.examples)
        if training.micro_batch_tokens is None:
            accumulation = cfg.step_sequences // training.micro_batch_size
            plan = batching.plan_epoch(lengths, training.micro_batch_size, accumulation, cfg.seed, epoch)
        else:
            plan = batching.plan_epoch_tokens(
                lengths,
                cfg.step_sequences,
                training.micro_batch_size,
                training.micro_batch_tokens,
                cfg.seed,
                epoch,
            )
        stats = batching.plan_stats(plan, lengths, training.micro_batch_tokens)
        self.plan_stats = batching.PlanStats(
            stats.oversized_sequences, max(stats.max_pass_tokens, self.plan_stats.max_pass_tokens)
        )
        plan = plan + [[] for _ in range(self.steps_per_epoch - len(plan))]
        counts = all_reduce([max(len(micros), 1) for micros in plan], "max")
        pad = [int(c) - len(micros) for micros, c in zip(plan, counts, strict=True)]
        return [micros + [[] for _ in range(n)] for micros, n in zip(plan, pad, strict=True)]

    def _one_step(self, micros: list[list[int]]) -> None:
        from raykd.kd.step import train_step

        started = time.perf_counter()
        batches = [batching.collate([self.examples[i] for i in m], self.k, self.pad_id) for m in micros]
        sums = train_step(self.engine, batches, self.device, self.shape, self.teacher, self.teacher_shape)
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        self.totals.add(sums, time.perf_counter() - started)
        self.global_step += 1

    def _after_step(self, epoch: int, step_in_epoch: int, total_steps: int) -> None:
        step = self.global_step
        last = step == total_steps
        save = step % self.cfg.training.checkpoint_every == 0 and not last
        if not (save or step % self.cfg.training.log_every == 0 or last):
            return
        started = time.perf_counter()
        self.totals.record_memory(self.memory)
        metrics = {"step": step, "epoch": epoch, **interval_metrics(self.totals)}
        self._log(metrics)
        if save:
            on = (epoch, step_in_epoch) if step_in_epoch < self.steps_per_epoch else (epoch + 1, 0)
            checkpoint.report(metrics, self.engine, self._state(), Position(step, *on), f"step{step}")
        else:
            import ray.train

            ray.train.report(metrics)
        self.totals.wall_s += time.perf_counter() - started  # reports and checkpoints are training time

    def _state(self) -> RankState:
        return RankState(self.rank, shard_digest(self.examples), len(self.examples), self.totals)

    # -------------------------------------------------------------------------------------- logging

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
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.cfg.tensorboard_dir)

    # -------------------------------------------------------------------------------------- the end

    def finish(self) -> None:
        """Save the student in Hugging Face format, then report the final metrics with a small checkpoint."""
        from raykd.kd.export import save_student

        started, self.at["trained"] = time.perf_counter(), time.time()
        cfg = self.cfg
        if not self.start.done:
            save_student(self.engine, cfg.training.zero_stage, cfg.student_out, cfg.models, self.rank)
        self.save_s = time.perf_counter() - started
        self.at["saved"] = time.time()
        if hasattr(self, "memory"):
            self.totals.record_memory(self.memory)
            self.memory.close()
        final = {
            "step": self.global_step,
            "epochs": cfg.training.epochs,
            **final_metrics(self.totals, self.prep, self.plan_stats),
            "setup_s": self.setup_s,
            "save_s": self.save_s,
            "gradient_checkpointing": int(cfg.checkpointing),
            "resumed_from_step": -1 if self.resumed_from is None else self.resumed_from,
            "node_id": _node_id(),
            "student_dir": cfg.student_out,
            **{f"at_{phase}": at for phase, at in self.at.items()},
        }
        if self.writer is not None:
            self.writer.close()
        done = Position(self.global_step, cfg.training.epochs, 0, done=True)
        checkpoint.report_final(final, self._state(), done)


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()
