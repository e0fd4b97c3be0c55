"""Shared set-up of the training benchmarks: traces, models and a one-process DeepSpeed engine.

Both benchmarks run `raykd.kd.step.train_step`, the step of the Ray Train worker, on a DeepSpeed engine at
world size 1 (gloo on CPU in fp32, NCCL on GPU in bf16), without Ray: what they compare is the step itself.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import torch

from raykd.kd import synthetic
from raykd.kd.deepspeed_config import build_engine, ds_config, init_single_process
from raykd.kd.examples import TRAIN_COLUMNS, Example, TrialData, prepare_examples, sort_by_key
from raykd.spec import LossSpec, TrainingSpec


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
    init_single_process("nccl" if dev.type == "cuda" else "gloo", free_port())


def trace_rows(traces: str | None, n: int, vocab: int, k: int, cot: tuple[int, int], seed: int) -> dict:
    """Rows of a trace Parquet folder, or synthetic ones (long chains of thought, see raykd.kd.synthetic)."""
    if traces:
        import pyarrow.parquet as pq

        cols = [c for c in TRAIN_COLUMNS if c in pq.read_schema(next(Path(traces).glob("*.parquet"))).names]
        return pq.read_table(traces, columns=cols).to_pydict()
    return synthetic.synthetic_rows(
        n, vocab=vocab, k=k, prompt_len=(32, 64), cot_len=cot, answer_len=(16, 32), seed=seed
    )


def examples(rows: dict, fraction: float) -> list[Example]:
    prepared, _ = prepare_examples(rows, TrialData(fraction=fraction))
    return sort_by_key(prepared)


def load_model(folder: str | None, **tiny: Any) -> torch.nn.Module:
    if folder:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return synthetic.tiny_llama(**tiny)


def engine(model: torch.nn.Module, dev: torch.device, micro: int, accumulation: int, zero: int = 2) -> Any:
    training = TrainingSpec(batch_size=micro * accumulation, micro_batch_size=micro, zero_stage=zero, lr=1e-4)
    config = ds_config(training, world_size=1, bf16=dev.type == "cuda")
    return build_engine(model.to(dev), LossSpec(), config)


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
