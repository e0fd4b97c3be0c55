"""Shared set-up of the training benchmarks: traces, models and a one-process DeepSpeed engine.

Both benchmarks run `raykd.kd.step.train_step`, the step of the Ray Train worker, on a DeepSpeed engine at
world size 1 (gloo on CPU in fp32, NCCL on GPU in bf16), without Ray: what they compare is the step itself.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import torch

from raykd.kd import batching, step, synthetic
from raykd.kd.batching import TrialData
from raykd.kd.losses import KDLossConfig


def device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(dev: torch.device, threads: int) -> None:
    # One intra-op thread by default: on a shared CPU box, ops split over threads spend their time waiting
    # for each other (a 2-layer forward took 20x longer on 2 threads than on 1 under load).
    torch.set_num_threads(threads)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    step.init_single_process("nccl" if dev.type == "cuda" else "gloo", free_port())


def trace_rows(traces: str | None, n: int, vocab: int, k: int, cot: tuple[int, int], seed: int) -> dict:
    """Rows of a trace Parquet folder, or synthetic ones (long chains of thought, see raykd.kd.synthetic)."""
    if traces:
        import pyarrow.parquet as pq

        cols = [
            c
            for c in batching.TRAIN_COLUMNS
            if c in pq.read_schema(next(Path(traces).glob("*.parquet"))).names
        ]
        return pq.read_table(traces, columns=cols).to_pydict()
    return synthetic.synthetic_rows(
        n, vocab=vocab, k=k, prompt_len=(32, 64), cot_len=cot, answer_len=(16, 32), seed=seed
    )


def examples(rows: dict, fraction: float) -> list[batching.Example]:
    prepared, _ = batching.prepare_examples(rows, TrialData(fraction=fraction))
    return batching.sort_by_key(prepared)


def load_model(folder: str | None, **tiny: Any) -> torch.nn.Module:
    if folder:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return synthetic.tiny_llama(**tiny)


def engine(model: torch.nn.Module, dev: torch.device, micro: int, accumulation: int, zero: int = 2) -> Any:
    config = step.ds_config(
        batch_size=micro * accumulation,
        micro_batch_size=micro,
        world_size=1,
        zero_stage=zero,
        lr=1e-4,
        weight_decay=0.0,
        bf16=dev.type == "cuda",
    )
    return step.build_engine(model.to(dev), KDLossConfig(), config)


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
