"""Build the Ray Train `TorchTrainer` (Train V2) of one KD trial from its `raykd.plan.TrialConfig`.

    from raykd.kd.trainer import build_trainer
    trainer = build_trainer(cfg, {"train": ray.data.read_parquet(cfg.traces_path)})
    result = trainer.fit()   # result.metrics: FINAL_METRICS below; result.checkpoint: the last one

The run is named by the trial id and stored in the trial's folder's parent (`<output_dir>/trials`), so the
same trainer resumes from its latest checkpoint. The config was validated with the spec on the driver; traces
that lack the columns the trial needs raise ValueError here, before any worker starts.

Workers: DeepSpeed on NCCL with bf16 when resources.gpus_per_worker > 0, on gloo with fp32 otherwise. A worker
that dies is replaced and the run resumes from the latest checkpoint, up to `run.max_failures` times.
"""

from __future__ import annotations

import os
from typing import Any

from raykd._compat import cpu_deepspeed_env
from raykd.kd.examples import TRAIN_COLUMNS
from raykd.models import HF_ENV
from raykd.plan import TrialConfig

# Metrics of the final ray.train.report (Result.metrics). Losses are token-weighted means over the last epoch
# and all workers; counts and FLOPs are totals over the run (all epochs, all workers).
FINAL_METRICS = {
    "ce": "cross-entropy on the supervised tokens (nats/token), last epoch",
    "kd": "KD divergence on the supervised tokens with a teacher signal, last epoch",
    "loss": "(1 - λ)·CE + λ·KD per supervised token, last epoch",
    "ce_prompt / ce_cot / ce_answer, kd_*, tokens_*": "the same per segment, and its supervised tokens",
    "topk_mass": "mean teacher probability mass covered by the cached top-k (1.0 with an online teacher)",
    "topk_dropped_entries / topk_dropped_mass / topk_unshared_targets": "a padded teacher's cached top-k "
    "entries past the student's rows, dropped by the loss (the rest renormalised over the shared rows): "
    "how many, the teacher's mean probability on them per position, positions left with none (CE only)",
    "supervised_tokens": "target tokens trained on",
    "kept_tokens": "tokens kept by truncation, of the sequences trained on",
    "forward_tokens": "tokens run through the student (kept tokens up to each sequence's last target)",
    "padded_tokens": "forward tokens plus padding, as run",
    "sequences": "sequences trained on, counted once per epoch",
    "tokens_per_s": "forward_tokens / wall_s (per-interval reports: over the steps' own time)",
    "flops": "model FLOPs from the formula in raykd.kd.model.ModelShape.forward_flops (3x for the student)",
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
    "at_entered / at_distributed / at_shard_read / at_models_built / at_trained / at_saved": "wall-clock "
    "times (time.time()) of rank 0's last attempt: train function entered, process group up, shard read, "
    "models and DeepSpeed engine built, last step done, student saved (raykd.trial's timeline)",
}
# Environment the workers need from the driver: DeepSpeed's JIT build cache and accelerator choice, and the
# Hugging Face cache and offline settings (never a token: raykd.models says why).
WORKER_ENV = ("TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "TOKENIZERS_PARALLELISM", *HF_ENV)


def build_trainer(cfg: TrialConfig, datasets: dict[str, Any], callbacks: list[Any] | None = None) -> Any:
    """A TorchTrainer running `raykd.kd.worker.train_func` on `datasets["train"]` (trace rows)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raykd.kd.worker import train_func

    train = _train_columns(datasets, cfg.training.kd.teacher_signal)
    gpu, res = cfg.use_gpu, cfg.resources
    resources = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if gpu else {})}
    return TorchTrainer(
        train_func,
        train_loop_config=cfg.model_dump(),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=res.workers_per_trial,
            use_gpu=gpu,
            resources_per_worker=resources | res.worker_resources,
        ),
        run_config=RunConfig(
            name=cfg.trial_id,
            storage_path=str(cfg.folder.parent),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": cpu_deepspeed_env(_driver_env(), gpu)},
            # Train logs every report (with its whole metrics dict) and checkpoint at INFO from each worker;
            # raykd's step lines say it in one. Train's own log files under the session keep every level.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": train},
        # Ordered, locality-free execution: the even split gives each rank the same rows again on a restart.
        dataset_config=DataConfig(execution_options=_ordered_ingest(), enable_shard_locality=False),
    )


def _train_columns(datasets: dict[str, Any], teacher_signal: str) -> Any:
    """The trace rows, only the columns training reads; an error when the trial's columns are missing."""
    if "train" not in datasets:
        raise ValueError(f"datasets must hold 'train' (the trace rows); got {sorted(datasets)}")
    train = datasets["train"]
    present = set(train.schema().names)
    needed = {"prompt_ids", "completion_ids", "segments"}
    if teacher_signal == "cached_topk":
        needed |= {"k", "topk_ids", "topk_logprobs"}
    missing = needed - present
    if missing:
        fix = "; use teacher_signal: online for traces without top-k logprobs" if "k" in missing else ""
        raise ValueError(f"the traces lack the columns {sorted(missing)} of the agreed trace schema{fix}")
    return train.select_columns([c for c in TRAIN_COLUMNS if c in present])


def _driver_env() -> dict[str, str]:
    return {k: os.environ[k] for k in WORKER_ENV if k in os.environ}


def _ordered_ingest() -> Any:
    """Ray Train's default ingest options, with the order preserved."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options
