"""Build the Ray Train `TorchTrainer` (Train V2) of one KD trial from a plain config dict.

    from raykd.kd.trainer import build_trainer
    trainer = build_trainer(train_cfg, {"train": ray.data.read_parquet(traces)}, storage_path, name)
    result = trainer.fit()   # result.metrics: FINAL_METRICS below; result.checkpoint: the last one

`train_cfg` holds the keys of `raykd.kd.worker.KDConfig`: the TrainingSpec and KDSpec fields, the grid point
(fraction, segments, seed, policy), the model folders (student_dir, teacher_dir, tokenizer_dir), where the
trained student goes (student_out) and the resources (workers_per_trial, gpus_per_worker, cpus_per_worker).
Problems with it, or teacher and student vocabularies that differ, raise ValueError here, before any worker
starts. The same trainer (same name and storage_path) resumes from its latest checkpoint.

Workers: DeepSpeed on NCCL with bf16 when gpus_per_worker > 0, on gloo with fp32 otherwise. A worker that dies
is replaced and the run resumes from the latest checkpoint, up to `max_failures` times.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from raykd.kd.batching import TRAIN_COLUMNS
from raykd.kd.worker import KDConfig
from raykd.models import HF_ENV

# Metrics of the final ray.train.report (Result.metrics). Losses are token-weighted means over the last epoch
# and all workers; counts and FLOPs are totals over the run (all epochs, all workers).
FINAL_METRICS = {
    "ce": "cross-entropy on the supervised tokens (nats/token), last epoch",
    "kd": "KD divergence on the supervised tokens with a teacher signal, last epoch",
    "loss": "(1 - λ)·CE + λ·KD per supervised token, last epoch",
    "ce_prompt / ce_cot / ce_answer, kd_*, tokens_*": "the same per segment, and its supervised tokens",
    "topk_mass": "mean teacher probability mass covered by the cached top-k (1.0 with an online teacher)",
    "supervised_tokens": "target tokens trained on",
    "kept_tokens": "tokens kept by truncation, of the sequences trained on",
    "forward_tokens": "tokens run through the student (kept tokens up to each sequence's last target)",
    "padded_tokens": "forward tokens plus padding, as run",
    "sequences": "sequences trained on, counted once per epoch",
    "tokens_per_s": "forward_tokens / wall_s (per-interval reports: over the steps' own time)",
    "flops": "model FLOPs from the formula in raykd.kd.step.ModelShape.forward_flops (3x for the student)",
    "peak_mem_bytes": "highest memory of any worker: CUDA allocated bytes on GPU, resident set size on CPU",
    "step_mem_bytes": "the same above what the worker held before its first step (weights, optimizer)",
    "wall_s": "training time (steps, reports, checkpoints), summed over restarts",
    "setup_s / save_s": "this attempt's shard reading, model loading and engine set-up / final HF save",
    "step / epochs": "optimizer steps taken / epochs asked for",
    "traces / traces_trained / traces_unsupervised / traces_budget_dropped": "traces read; trained on; left "
    "without a supervised token after truncation and masking; left out by the budget_matched control",
    "dummy_micro_batches / skipped_steps": "zero-weight micro-batches run by short shards (and, with "
    "micro_batch_tokens, by workers needing fewer passes in a step); steps with no supervised token on any "
    "worker (not applied)",
    "oversized_sequences": "sequences longer than micro_batch_tokens, each trained whole in a pass of its "
    "own every epoch (0 without a budget)",
    "max_pass_tokens": "most padded tokens (rows x longest row) of a forward pass holding no oversized "
    "sequence: at most micro_batch_tokens",
    "gradient_checkpointing": "1 when decoder activations were recomputed in the backward pass, else 0",
    "resumed_from_step": "the checkpoint step the last attempt started from, -1 for none",
    "student_dir": "the trained student, a Hugging Face folder (float32 on CPU, bf16 on GPU safetensors)",
}
# Keys the launcher may add that the worker does not read.
TRAINER_KEYS = ("max_failures", "keep_checkpoints", "keep_optimizer_state")
# Environment the workers need from the driver: DeepSpeed's JIT build cache and accelerator choice, and the
# Hugging Face cache and offline settings (never a token: raykd.models says why).
WORKER_ENV = ("TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "TOKENIZERS_PARALLELISM", *HF_ENV)


def build_trainer(
    train_cfg: dict[str, Any],
    datasets: dict[str, Any],
    storage_path: str,
    name: str,
    callbacks: list[Any] | None = None,
) -> Any:
    """A TorchTrainer running `raykd.kd.worker.train_func` on `datasets["train"]` (trace rows)."""
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    from raykd.kd.worker import train_func

    worker_cfg = {k: v for k, v in train_cfg.items() if k not in TRAINER_KEYS}
    cfg = KDConfig.from_dict(worker_cfg)
    check_config(cfg)
    if "train" not in datasets:
        raise ValueError(f"datasets must hold 'train' (the trace rows); got {sorted(datasets)}")
    train = datasets["train"]
    present = set(train.schema().names)
    needed = {"prompt_ids", "completion_ids", "segments"}
    if cfg.teacher_signal == "cached_topk":
        needed |= {"k", "topk_ids", "topk_logprobs"}
    missing = needed - present
    if missing:
        fix = "; use teacher_signal: online for traces without top-k logprobs" if "k" in missing else ""
        raise ValueError(f"the traces lack the columns {sorted(missing)} of the agreed trace schema{fix}")
    train = train.select_columns([c for c in TRAIN_COLUMNS if c in present])
    gpu = cfg.use_gpu
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    if not gpu:
        env["DS_ACCELERATOR"] = "cpu"
    elif env.get("DS_ACCELERATOR") == "cpu":  # a CPU driver's setting must not pin GPU workers to the CPU
        del env["DS_ACCELERATOR"]
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if gpu else {})}
    resources |= cfg.worker_resources
    return TorchTrainer(
        train_func,
        train_loop_config=worker_cfg,
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers_per_trial, use_gpu=gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=int(train_cfg.get("max_failures", 2))),
            checkpoint_config=CheckpointConfig(num_to_keep=int(train_cfg.get("keep_checkpoints", 2))),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": env},
            # Train logs every report (with its whole metrics dict) and checkpoint at INFO from each worker;
            # raykd's step lines say it in one. Train's own log files under the session keep every level.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": train},
        # Ordered, locality-free execution: the even split gives each rank the same rows again on a restart.
        dataset_config=DataConfig(execution_options=_ordered_ingest(), enable_shard_locality=False),
    )


def _ordered_ingest() -> Any:
    """Ray Train's default ingest options, with the order preserved."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def check_config(cfg: KDConfig) -> None:
    """Every problem with a trial's training config at once, before any worker starts."""
    from raykd import truncation
    from raykd.kd.batching import POLICY_WINDOWS
    from raykd.traces import checks

    problems = []
    if cfg.micro_batch_tokens is not None:  # token-bounded passes: each worker takes batch_size / workers
        if cfg.batch_size % cfg.workers_per_trial:
            workers = cfg.workers_per_trial
            problems.append(f"batch_size {cfg.batch_size} is not a multiple of workers {workers}")
    elif cfg.batch_size % (cfg.micro_batch_size * cfg.workers_per_trial):
        per_pass = cfg.micro_batch_size * cfg.workers_per_trial
        problems.append(
            f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size x workers = {per_pass}"
        )
    if cfg.truncation_policy not in POLICY_WINDOWS:
        problems.append(f"truncation_policy {cfg.truncation_policy!r} is not one of {list(POLICY_WINDOWS)}")
    for check in (
        lambda: truncation.as_fraction(cfg.fraction),
        lambda: truncation.segment_codes(cfg.segments),
    ):
        try:
            check()
        except ValueError as e:
            problems.append(str(e))
    if cfg.zero_stage not in (0, 1, 2, 3):
        problems.append(f"zero_stage {cfg.zero_stage} is not 0, 1, 2 or 3")
    if cfg.teacher_signal not in ("cached_topk", "online"):
        problems.append(f"teacher_signal {cfg.teacher_signal!r} is not 'cached_topk' or 'online'")
    if cfg.teacher_signal == "online" and not cfg.teacher_dir:
        problems.append("teacher_signal 'online' needs teacher_dir (the teacher model folder)")
    if not Path(cfg.student_dir).is_dir():
        problems.append(f"student_dir {cfg.student_dir} is not a folder")
    for name in ("teacher_dir", "tokenizer_dir"):
        if getattr(cfg, name) and not Path(getattr(cfg, name)).is_dir():
            problems.append(f"{name} {getattr(cfg, name)} is not a folder")
    if cfg.teacher_dir and all(Path(d).is_dir() for d in (cfg.student_dir, cfg.teacher_dir)):
        # the driver checked before generation; a trainer built on its own is checked the same way
        try:
            trust = cfg.trust_remote_code
            checks.check_vocabulary(cfg.teacher_dir, cfg.student_dir, cfg.tokenizer_dir, trust)
        except (ValueError, OSError) as e:
            problems.append(str(e))
    if problems:
        raise ValueError("cannot train this trial:\n" + "\n".join(f"  - {p}" for p in problems))
