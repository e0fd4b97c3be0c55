"""Real problem sources: local JSONL / Parquet / saved ``datasets`` folders, existing trace datasets, GSM.

Every reader checks every row before returning, so a bad file fails whole (nothing half-loaded), with a
``ProblemFileError`` that names the file, the row and the field.

- ``load_problems``: prompts with reference answers, from configurable fields.
- ``load_trace_dataset``: finished traces in the Bespoke-Stratos / OpenThoughts layout, an alternative to
  generating traces with a teacher.
- ``gsm_problems``: reasoning-gym's ``gsm_symbolic`` generator, real-text math problems offline (optional
  extra: ``pip install reasoning-gym``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from raykd.files import write_jsonl_atomic
from raykd.problems.answers import last_boxed
from raykd.problems.tasks import Problem, Split, split_of

BEGIN_THOUGHT, END_THOUGHT = "<|begin_of_thought|>", "<|end_of_thought|>"
BEGIN_SOLUTION, END_SOLUTION = "<|begin_of_solution|>", "<|end_of_solution|>"
USER_ROLES, ASSISTANT_ROLES = ("user", "human"), ("assistant", "gpt")


class ProblemFileError(ValueError):
    """A problems or traces file that cannot be used; the message names the file, and the row and field."""

    def __init__(self, path: str | Path, message: str, row: int | None = None, field: str | None = None):
        where = (
            str(path)
            + ("" if row is None else f": row {row}")
            + ("" if field is None else f", field {field!r}")
        )
        super().__init__(f"{where}: {message}")
        self.path, self.row, self.field = Path(path), row, field


def load_problems(
    path: str | Path,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    id_field: str | None = None,
    split: str | None = None,
) -> list[Problem]:
    """Problems from a ``.jsonl`` file, a ``.parquet`` file or a ``datasets.save_to_disk`` folder.

    Rows are numbered from 0. Answers that are numbers are turned into text; a missing or empty prompt, a
    missing answer, a duplicate id, an empty file or text that is not UTF-8 raises ProblemFileError. Without
    ``id_field``, ids are ``<file stem>-<row>``. ``split`` picks one split of a saved ``DatasetDict``.
    """
    path = Path(path)
    problems, seen = [], set()
    for row, record in read_rows(path, split):
        prompt = _text(path, row, record, prompt_field, allow_numbers=False)
        answer = _text(path, row, record, answer_field, allow_numbers=True)
        problem_id = f"{path.stem}-{row}" if id_field is None else _text(path, row, record, id_field, True)
        if problem_id in seen:
            raise ProblemFileError(path, f"duplicate id {problem_id!r}", row, id_field)
        seen.add(problem_id)
        problems.append(Problem(id=problem_id, prompt=prompt, answer=answer))
    return problems


def load_trace_dataset(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Finished traces in the Bespoke-Stratos / OpenThoughts layout.

    Each row holds ``conversations``: a list of ``{"from": "user"|"assistant", "value": str}`` (ShareGPT's
    "human"/"gpt" also accepted), the assistant text holding ``<|begin_of_thought|>...<|end_of_thought|>``
    then ``<|begin_of_solution|>...<|end_of_solution|>``. Returns one dict per row with: id, system
    (str | None), prompt, completion (the assistant text verbatim), cot_span and answer_span (character
    offsets ``[start, end)`` into completion: the thought with its markers, then everything after it),
    thought, solution, answer (last ``\\boxed{}`` of the solution, or None) and think_completion (the same
    text in ``<think>`` form).
    """
    path = Path(path)
    return [_trace(path, row, record) for row, record in read_rows(path, split)]


def gsm_problems(split: Split, n: int, seed: int) -> list[Problem]:
    """``n`` GSM8K-style word problems with integer answers from reasoning-gym's ``gsm_symbolic`` generator.

    Train and eval never share a problem (split by a hash of the question, as for the built-in tasks).
    """
    try:
        import reasoning_gym
    except ImportError as error:  # an optional extra
        raise ImportError("gsm_problems needs reasoning-gym: pip install reasoning-gym") from error
    problems: dict[str, Problem] = {}
    batch = 0
    while len(problems) < n:
        # reasoning-gym draws a fixed sequence per seed: take fresh seeds until the split has n questions.
        entries = reasoning_gym.create_dataset("gsm_symbolic", size=max(2 * n, 16), seed=seed * 1000 + batch)
        before = len(problems)
        for entry in entries:
            question = entry["question"]
            if split_of(question) == split and question not in problems and len(problems) < n:
                digest = hashlib.blake2b(question.encode(), digest_size=8).hexdigest()
                problems[question] = Problem(id=f"gsm-{digest}", prompt=question, answer=str(entry["answer"]))
        batch += 1
        if len(problems) == before and batch > 50:
            raise ValueError(f"gsm_symbolic yields fewer than {n} distinct {split} problems")
    return list(problems.values())


def save_problems(path: str | Path, problems: Sequence[Problem]) -> Path:
    """Write ``problems`` as JSONL (fields id, prompt, answer) atomically: a crash leaves no partial file."""
    return write_jsonl_atomic(path, ({"id": p.id, "prompt": p.prompt, "answer": p.answer} for p in problems))


def read_rows(path: Path, split: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row, record) pairs of a JSONL file, a Parquet file or a ``datasets`` folder; errors name the file.

    The whole file is read and checked for text before the first row is yielded.
    """
    if path.is_dir():
        rows = _dataset_rows(path, split)
    elif not path.exists():
        raise ProblemFileError(path, "no such file or folder")
    elif path.suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif path.suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        raise ProblemFileError(path, "unknown format; use .jsonl, .parquet or a datasets.save_to_disk folder")
    if not rows:
        raise ProblemFileError(path, "the file holds no rows")
    return iter(enumerate(rows))


def _jsonl_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line_number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        row, where = len(rows), f"line {line_number}"
        # Decode keeping bad bytes as surrogates, so the error can name the field that holds them.
        try:
            record = json.loads(raw.decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError as error:
            raise ProblemFileError(path, f"{where} is not valid JSON ({error.msg})", row) from None
        if not isinstance(record, dict):
            raise ProblemFileError(path, f"{where} is a JSON {type(record).__name__}, not an object", row)
        _check_utf8(path, row, record, where)
        rows.append(record)
    return rows


def _check_utf8(path: Path, row: int, record: dict[str, Any], where: str) -> None:
    for field, value in _strings(record):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            bad = value[error.start].encode("utf-8", errors="surrogateescape")
            message = f"{where}: bytes that are not UTF-8 ({bad!r} at character {error.start})"
            raise ProblemFileError(path, message, row, field) from None


def _strings(value: Any, name: str = "") -> Iterator[tuple[str, str]]:
    # (dotted field name, string) for every key and string value, nested ones included.
    if isinstance(value, str):
        yield name, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key, f"{name}.{key}".lstrip("."))
            yield from _strings(item, f"{name}.{key}".lstrip("."))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{name}[{index}]")


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise ProblemFileError(path, f"not a readable Parquet file ({error})") from None
    return _decoded(path, table.to_pylist())


def _dataset_rows(path: Path, split: str | None) -> list[dict[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise ProblemFileError(path, f"not a datasets.save_to_disk folder ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = sorted(loaded)
        if split is None and len(names) != 1:
            raise ProblemFileError(path, f"a DatasetDict with splits {names}: pass split=")
        if split is not None and split not in loaded:
            raise ProblemFileError(path, f"no split {split!r}; it has {names}")
        loaded = loaded[split or names[0]]
    return _decoded(path, loaded.to_list())


def _decoded(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Arrow string columns are UTF-8 by construction; binary columns are decoded here, row by row.
    for row, record in enumerate(rows):
        for field, value in record.items():
            if isinstance(value, bytes):
                try:
                    record[field] = value.decode("utf-8")
                except UnicodeDecodeError as error:
                    bad = value[error.start : error.start + 1]
                    message = f"bytes that are not UTF-8 ({bad!r} at byte {error.start})"
                    raise ProblemFileError(path, message, row, field) from None
    return rows


def _text(path: Path, row: int, record: dict[str, Any], field: str, allow_numbers: bool) -> str:
    if field not in record:
        present = ", ".join(sorted(record)) or "none"
        raise ProblemFileError(path, f"missing field (fields present: {present})", row, field)
    value = record[field]
    if allow_numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ProblemFileError(path, f"expected text, got {type(value).__name__}", row, field)
    if not value.strip():
        raise ProblemFileError(path, "empty text", row, field)
    return value


def _trace(path: Path, row: int, record: dict[str, Any]) -> dict[str, Any]:
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise ProblemFileError(path, "missing or not a list of turns", row, "conversations")
    prompt = _turn(path, row, turns, USER_ROLES)
    completion = _turn(path, row, turns, ASSISTANT_ROLES)
    start, end = completion.find(BEGIN_THOUGHT), completion.find(END_THOUGHT)
    if start < 0 or end < start:
        message = f"assistant text lacks {BEGIN_THOUGHT}...{END_THOUGHT}"
        raise ProblemFileError(path, message, row, "conversations")
    end += len(END_THOUGHT)
    thought = completion[start + len(BEGIN_THOUGHT) : end - len(END_THOUGHT)].strip()
    rest = completion[end:]
    solution = rest.replace(BEGIN_SOLUTION, "").replace(END_SOLUTION, "").strip()
    system = record.get("system")
    return {
        "id": str(record.get("id", f"{path.stem}-{row}")),
        "system": system if isinstance(system, str) and system.strip() else None,
        "prompt": prompt,
        "completion": completion,
        "cot_span": (start, end),
        "answer_span": (end, len(completion)),
        "thought": thought,
        "solution": solution,
        "answer": last_boxed(solution),
        "think_completion": f"<think>\n{thought}\n</think>\n\n{solution}",
    }


def _turn(path: Path, row: int, turns: list[Any], roles: tuple[str, ...]) -> str:
    for index, turn in enumerate(turns):
        if isinstance(turn, dict) and turn.get("from") in roles:
            value = turn.get("value")
            if not isinstance(value, str) or not value.strip():
                raise ProblemFileError(path, "missing or empty text", row, f"conversations[{index}].value")
            return value
    raise ProblemFileError(path, f"no turn from {' or '.join(roles)}", row, "conversations")
