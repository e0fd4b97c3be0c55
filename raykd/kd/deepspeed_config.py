"""The DeepSpeed side of a KD trial: the engine config from the spec's training settings, the engine over
`raykd.kd.model.KDStudent`, and torch.distributed for a single process (benchmarks, tests)."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from raykd.kd.losses import CHUNK_SIZE
from raykd.kd.model import KDStudent, enable_checkpointing
from raykd.spec import LossSpec, TrainingSpec


def ds_config(training: TrainingSpec, world_size: int, bf16: bool, grad_clip: float = 1.0) -> dict[str, Any]:
    """DeepSpeed config: global batch = micro x accumulation x workers, AdamW, ZeRO stage, bf16 on GPU.

    `train_step` marks each step's last micro-batch as the accumulation boundary itself, so the batch
    figures here are DeepSpeed's bookkeeping only. With a token budget (training.micro_batch_tokens)
    micro-batches hold varying numbers of sequences: the config then counts one sequence per micro-batch.
    The spec saw to it that batch_size divides over them (raykd.spec: training.batch_size).
    """
    batch_size, zero_stage = training.batch_size, training.zero_stage
    micro = 1 if training.micro_batch_tokens is not None else training.micro_batch_size
    per_pass = micro * world_size
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:  # the final Hugging Face save needs the whole weights on rank 0
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": batch_size // per_pass,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "gradient_clipping": grad_clip,
        # torch's AdamW: DeepSpeed's fused/CPU Adam would JIT-build a C++/CUDA op on first use.
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": training.lr, "weight_decay": training.weight_decay, "torch_adam": True},
        },
        "steps_per_print": 10**9,  # our own log line replaces DeepSpeed's
        "wall_clock_breakdown": False,
    }


def build_engine(
    model: nn.Module,
    loss: LossSpec,
    config: dict[str, Any],
    checkpointing: bool = False,
    chunk_size: int = CHUNK_SIZE,
) -> Any:
    """A DeepSpeed engine over KDStudent(model); distributed must already be initialised."""
    import deepspeed

    if checkpointing:
        enable_checkpointing(model)
    model.train()  # from_pretrained returns eval mode; checkpointing (and dropout) act only in train mode
    module = KDStudent(model, loss, chunk_size)
    if config["zero_optimization"]["stage"] == 3:
        module.register_zero3()
    params = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=module, model_parameters=params, config=config)
    return engine


def init_single_process(backend: str = "gloo", port: int = 29510) -> None:
    """torch.distributed for one process without a launcher (benchmarks, tests); Ray Train does it itself."""
    import deepspeed

    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }.items():
        os.environ.setdefault(key, value)
    if backend == "gloo":
        from raykd._compat import skip_deepspeed_shm_comm

        skip_deepspeed_shm_comm()
    deepspeed.init_distributed(dist_backend=backend)
