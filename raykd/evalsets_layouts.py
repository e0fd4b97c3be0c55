"""An evaluation set's file read in its layout: problems, multiple-choice questions as lettered prompts.

The layouts (`evaluation.sets[i].layout`):

- ``problem_answer``: a prompt field and an answer field (AIME: problem/answer; MATH-500:
  problem/answer/solution, the solution unused). Defaults: ``problem`` and ``answer``.
- ``gpqa``: a question, its correct answer and the wrong ones in separate fields (GPQA's own layout:
  ``Question``, ``Correct Answer``, ``Incorrect Answer 1..3``). The choices are shuffled once per question
  (seeded by its text, so every run shows the same order) and lettered; the reference is the letter.
- ``choices``: a question, a list of choices, and the answer as a 0-based index, a letter, or the text of
  one choice. The file's order is kept.

A multiple-choice prompt asks for the letter in ``\\boxed{}``, scored with the ``math`` check (math-verify
reads ``\\boxed{B}`` and ``\\text{(B)}`` alike). Every row is checked as it is read
(`raykd.problems.sources`); raykd.evalsets then checks that the reference answers parse for the set's check.

Light: the readers import what a file needs when it is read.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import replace
from pathlib import Path
from typing import Any

from raykd.evalsets_spec import EvalSetSpec

CHOICE_PROMPT = "Put the letter of the correct choice ({letters}) in \\boxed{{}}."


def read_problems(spec: EvalSetSpec) -> list[Any]:
    """The problems of a 'file' set (raykd.problems.tasks.Problem), read in its layout; raises a
    ProblemFileError naming the row and field of a bad record."""
    from raykd.problems.sources import load_problems, read_rows
    from raykd.problems.tasks import Problem

    prompt, answer = spec.fields()
    if spec.layout == "problem_answer":
        problems = load_problems(spec.path, prompt, answer, spec.id_field, spec.split)  # type: ignore[arg-type]
        if spec.id_field is None:  # ids name the set, not the file: they seed the samples and key the results
            problems = [replace(p, id=f"{spec.name}-{row}") for row, p in enumerate(problems)]
        return problems
    path = Path(spec.path)  # type: ignore[arg-type]
    rows = read_rows(path, spec.split)
    read = _gpqa_row if spec.layout == "gpqa" else _choices_row
    problems, seen = [], set()
    for row, record in rows:
        question, choices, correct = read(path, row, record, spec)
        problem_id = (
            f"{spec.name}-{row}" if spec.id_field is None else _field(path, row, record, spec.id_field)
        )
        if problem_id in seen:
            from raykd.problems.sources import ProblemFileError

            raise ProblemFileError(path, f"duplicate id {problem_id!r}", row, spec.id_field)
        seen.add(problem_id)
        problems.append(Problem(id=problem_id, prompt=choice_prompt(question, choices), answer=correct))
    return problems


def choice_prompt(question: str, choices: list[str]) -> str:
    """The multiple-choice prompt: the question, one lettered line per choice, where to put the letter."""
    letters = string.ascii_uppercase[: len(choices)]
    lines = [f"{letter}) {choice}" for letter, choice in zip(letters, choices, strict=True)]
    named = ", ".join(letters[:-1]) + f" or {letters[-1]}"
    return f"{question.strip()}\n\n" + "\n".join(lines) + "\n\n" + CHOICE_PROMPT.format(letters=named)


def _gpqa_row(path: Path, row: int, record: dict[str, Any], spec: EvalSetSpec) -> tuple[str, list[str], str]:
    prompt, answer = spec.fields()
    question, correct = _field(path, row, record, prompt), _field(path, row, record, answer).strip()
    choices = [correct] + [_field(path, row, record, f).strip() for f in spec.distractors()]
    # GPQA stores the correct answer in its own column: without a shuffle it would always be choice A.
    seed = int.from_bytes(hashlib.blake2b(question.encode(), digest_size=8).digest(), "big")
    random.Random(seed).shuffle(choices)
    return question, choices, string.ascii_uppercase[choices.index(correct)]


def _choices_row(
    path: Path, row: int, record: dict[str, Any], spec: EvalSetSpec
) -> tuple[str, list[str], str]:
    from raykd.problems.sources import ProblemFileError

    prompt, answer = spec.fields()
    question = _field(path, row, record, prompt)
    choices = record.get(spec.choices_field)  # type: ignore[arg-type]
    if (
        not isinstance(choices, list)
        or not 2 <= len(choices) <= 26
        or not all(isinstance(c, str) for c in choices)
    ):
        message = "expected a list of 2 to 26 texts"
        raise ProblemFileError(path, message, row, spec.choices_field)
    if answer not in record:
        raise ProblemFileError(
            path, f"missing field (fields present: {', '.join(sorted(record))})", row, answer
        )
    letter = _choice_letter(record[answer], choices)
    if letter is None:
        message = f"{record[answer]!r} is not an index, letter or text of the {len(choices)} choices"
        raise ProblemFileError(path, message, row, answer)
    return question, [c.strip() for c in choices], letter


def _choice_letter(value: Any, choices: list[str]) -> str | None:
    letters = string.ascii_uppercase[: len(choices)]
    if isinstance(value, int) and not isinstance(value, bool):
        return letters[value] if 0 <= value < len(choices) else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    stripped = [c.strip() for c in choices]
    return letters[stripped.index(text)] if text in stripped else None


def _field(path: Path, row: int, record: dict[str, Any], field: str) -> str:
    from raykd.problems.sources import _text

    return _text(path, row, record, field, allow_numbers=True)
