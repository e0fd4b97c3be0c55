"""Named evaluation sets (`evaluation.sets` in the spec): benchmark files such as AIME, MATH-500 or
GPQA-Diamond, or the held-out split of the training problems, each with its own answer check and sampling.

A set names a local JSONL or Parquet file or a `datasets.save_to_disk` folder (on a cluster, shared storage)
in one of three layouts:

- ``problem_answer``: a prompt field and an answer field (AIME: problem/answer; MATH-500:
  problem/answer/solution, the solution unused). Defaults: ``problem`` and ``answer``.
- ``gpqa``: a question, its correct answer and the wrong ones in separate fields (GPQA's own layout:
  ``Question``, ``Correct Answer``, ``Incorrect Answer 1..3``). The choices are shuffled once per question
  (seeded by its text, so every run shows the same order) and lettered; the reference is the letter.
- ``choices``: a question, a list of choices, and the answer as a 0-based index, a letter, or the text of
  one choice. The file's order is kept.

A multiple-choice prompt asks for the letter in ``\\boxed{}``, scored with the ``math`` check (math-verify
reads ``\\boxed{B}`` and ``\\text{(B)}`` alike). Reading a set checks every row (`raykd.problems.sources`) and
that the reference answers parse for the set's check; errors name ``evaluation.sets[i]``, the set and key.

Light: pydantic at import, the readers import what a file needs when it is read.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

LAYOUTS = ("problem_answer", "gpqa", "choices")
# (prompt_field, answer_field) when the spec leaves them out, per layout.
DEFAULT_FIELDS = {
    "problem_answer": ("problem", "answer"),
    "gpqa": ("Question", "Correct Answer"),
    "choices": ("question", "answer"),
}
GPQA_DISTRACTORS = ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
CHOICE_PROMPT = "Put the letter of the correct choice ({letters}) in \\boxed{{}}."


class EvalSetSpec(BaseModel):
    """One named evaluation set; sampling settings left out come from the `evaluation` section."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$",
        max_length=64,
        description="The set's name in the results (e.g. aime24); letters, digits and _ . + -.",
    )
    source: Literal["file", "heldout"] = Field(
        "file",
        description="'file' (path: a benchmark file) or 'heldout' (the held-out split of the training "
        "problems, problems.eval_size of them).",
    )
    path: str | None = Field(
        None,
        description="JSONL, Parquet or datasets.save_to_disk folder (source: file); on a cluster, shared.",
    )
    split: str | None = Field(None, description="The split to read from a saved DatasetDict folder.")
    layout: Literal[LAYOUTS] = Field(  # type: ignore[valid-type]
        "problem_answer",
        description="'problem_answer' (AIME, MATH-500), 'gpqa' (question, correct and incorrect answers in "
        "fields) or 'choices' (question, a list of choices, the answer's index, letter or text).",
    )
    prompt_field: str | None = Field(
        None,
        description="Field of the prompt (question); default problem, Question (gpqa), question (choices).",
    )
    answer_field: str | None = Field(
        None,
        description="Field of the reference answer; default answer, Correct Answer (gpqa), answer (choices).",
    )
    id_field: str | None = Field(None, description="Field of a unique problem id; default <name>-<row>.")
    choices_field: str | None = Field(
        None, description="Field holding the list of choices (layout: choices)."
    )
    distractor_fields: list[str] | None = Field(
        None,
        min_length=1,
        description="Fields of the wrong answers (layout: gpqa); default Incorrect Answer 1, 2 and 3.",
    )
    check: Literal["exact", "math"] | None = Field(
        None,
        description="Answer check: 'exact' or 'math' (math-verify, \\boxed{}); default 'math' for a file, "
        "problems.answer_check for the heldout set.",
    )
    limit: int | None = Field(None, gt=0, description="Evaluate only the first N problems (a quick check).")
    size: int | None = Field(
        None,
        gt=0,
        description="The number of problems the file holds (AIME 2024: 30, MATH-500: 500): a file of another "
        "size is refused, and a dry run on a machine without the file bills this many.",
    )
    samples: int | None = Field(None, gt=0, description="Samples per problem; default evaluation.samples.")
    temperature: float | None = Field(None, ge=0, description="Default evaluation.temperature.")
    top_p: float | None = Field(None, gt=0, le=1, description="Default evaluation.top_p.")
    max_tokens: int | None = Field(None, gt=0, description="Default evaluation.max_tokens.")

    @model_validator(mode="after")
    def _consistent(self) -> EvalSetSpec:
        problems = _source_problems(self) + _layout_problems(self)
        if problems:
            raise ValueError(f"set '{self.name}': " + "; ".join(problems))
        return self

    def fields(self) -> tuple[str, str]:
        """(prompt_field, answer_field) with the layout's defaults."""
        prompt, answer = DEFAULT_FIELDS[self.layout]
        return self.prompt_field or prompt, self.answer_field or answer


def _source_problems(spec: EvalSetSpec) -> list[str]:
    if spec.source == "file":
        if spec.path is None:
            return ["path is required when source is 'file'; name the benchmark file or folder"]
        if "://" in spec.path:
            return [f"path {spec.path!r} is a URI; give a file system path (on a cluster, shared storage)"]
        return []
    given = [
        key
        for key in ("path", "split", "prompt_field", "answer_field", "id_field", "size")
        if getattr(spec, key)
    ]
    if spec.layout != "problem_answer" or spec.choices_field or spec.distractor_fields:
        given.append("layout")
    return (
        [f"source 'heldout' reads the training source's held-out split; drop {', '.join(given)}"]
        if given
        else []
    )


def _layout_problems(spec: EvalSetSpec) -> list[str]:
    problems = []
    if spec.layout == "choices" and spec.choices_field is None:
        problems.append("layout 'choices' needs choices_field: the field holding the list of choices")
    if spec.layout != "choices" and spec.choices_field is not None:
        problems.append("choices_field applies to layout 'choices'; set layout: choices or drop it")
    if spec.layout != "gpqa" and spec.distractor_fields is not None:
        problems.append("distractor_fields applies to layout 'gpqa'; set layout: gpqa or drop it")
    if spec.layout != "problem_answer" and spec.check == "exact":
        problems.append(f"layout '{spec.layout}' asks for the letter in \\boxed{{}}; use check: math")
    return problems


def unique_set_names(sets: list[EvalSetSpec]) -> list[EvalSetSpec]:
    """Reject two sets with one name (their rows in the results would merge)."""
    seen: dict[str, int] = {}
    for index, eval_set in enumerate(sets):
        if eval_set.name in seen:
            raise ValueError(
                f"set name '{eval_set.name}' is used by sets {seen[eval_set.name]} and {index}; give each "
                "set its own name"
            )
        seen[eval_set.name] = index
    return sets


# --- reading ---------------------------------------------------------------------------------------------


class EvalSetError(ValueError):
    """Evaluation sets that cannot be used; ``problems`` lists each finding, naming the set and key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(
            f"{len(problems)} problem(s) with evaluation.sets\n" + "\n".join(f"  - {p}" for p in problems)
        )


@dataclass(frozen=True)
class EvalSet:
    """A set read and checked, with its sampling resolved against the `evaluation` section.

    A set the dry run could not read (its file is not on this machine, or the held-out split is not cut yet)
    has no problems; ``missing`` says why and ``expected`` is the count the plan bills for it (None: unknown).
    """

    name: str
    problems: list[Any]  # raykd.problems.tasks.Problem
    check: str
    samples: int
    temperature: float
    top_p: float
    max_tokens: int
    source: str = "file"
    unparseable: int = 0  # reference answers the check cannot parse (those problems count as wrong)
    missing: str = ""
    expected: int | None = None

    @property
    def n_problems(self) -> int | None:
        """The problems it evaluates: those read, or for a set not read the count expected."""
        return self.expected if self.missing else len(self.problems)

    @property
    def max_completion_tokens(self) -> int:
        """The most tokens evaluating this set can generate per model: problems x samples x max_tokens
        (0 for a set of unknown size)."""
        return (self.n_problems or 0) * self.samples * self.max_tokens


class _KeyError(ValueError):
    """A set error that names its own spec key (``key``: '.size', ...)."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


def _resolved(spec: EvalSetSpec, evaluation: Any, check: str, problems: list[Any], **kw: Any) -> EvalSet:
    return EvalSet(
        name=spec.name,
        problems=problems,
        check=check,
        samples=spec.samples or evaluation.samples,
        temperature=evaluation.temperature if spec.temperature is None else spec.temperature,
        top_p=spec.top_p or evaluation.top_p,
        max_tokens=spec.max_tokens or evaluation.max_tokens,
        source=spec.source,
        **kw,
    )


def read_set(
    spec: EvalSetSpec, evaluation: Any, default_check: str, heldout: list[Any] | None = None
) -> EvalSet:
    """Read and check one set; ``evaluation`` (raykd.spec.EvaluationSpec) supplies the sampling left out,
    ``heldout`` the problems of a 'heldout' set. Raises ValueError (a ProblemFileError for the file)."""
    if spec.source == "heldout":
        problems, check = list(heldout or []), spec.check or default_check
    else:
        problems, check = _read_file(spec), spec.check or "math"
        if spec.size is not None and len(problems) != spec.size:
            raise _KeyError(
                ".size",
                f"{spec.path} holds {len(problems)} problems, size says {spec.size}; bring the whole "
                "benchmark file (README: Results and evaluation sets) or correct size",
            )
    problems = problems[: spec.limit] if spec.limit else problems
    unparseable = _unparseable(problems, check)
    if problems and unparseable == len(problems):
        example = problems[0].answer
        raise ValueError(
            f"none of the {len(problems)} reference answers parse for check '{check}' (first: {example!r}); "
            "name the field that holds the final answer (answer_field) or use check: exact"
        )
    return _resolved(spec, evaluation, check, problems, unparseable=unparseable)


def unread_set(spec: EvalSetSpec, evaluation: Any, default_check: str, eval_size: int, why: str) -> EvalSet:
    """A set as the plan sees it without reading it: no problems, ``expected`` from its size (capped by
    limit) or problems.eval_size for the held-out split; ``why`` says why it was not read."""
    size = eval_size if spec.source == "heldout" else spec.size
    expected = min(size, spec.limit) if size and spec.limit else size or spec.limit
    check = spec.check or (default_check if spec.source == "heldout" else "math")
    return _resolved(spec, evaluation, check, [], missing=why, expected=expected)


def planned_sets(spec: Any, sets: list[EvalSet] | None = None) -> list[EvalSet]:
    """The sets a sweep (raykd.spec.SweepSpec) evaluates every trial on, for its cost: ``sets`` when read
    (the dry run), else from the spec alone (`unread_set`); with no evaluation.sets, the held-out problems
    under the evaluation settings."""
    if sets:
        return sets
    ev, problems = spec.evaluation, spec.problems
    if not ev.sets:
        heldout = EvalSetSpec(name="heldout", source="heldout")
        return [unread_set(heldout, ev, problems.answer_check, problems.eval_size, "not read")]
    return [unread_set(s, ev, problems.answer_check, problems.eval_size, "not read") for s in ev.sets]


def read_sets(
    spec: Any, heldout: list[Any] | None = None, cwd: Path | None = None, *, missing_ok: bool = False
) -> list[EvalSet]:
    """Every set of ``spec.evaluation.sets`` (a raykd.spec.SweepSpec), read and checked; all problems are
    reported at once in an EvalSetError. Relative paths are taken against ``cwd`` (the shell's, default).

    Without ``heldout`` problems (the dry run, before the split is cut) a 'heldout' set is not read; with
    ``missing_ok`` (the dry run) neither is a file that is not on this machine (a cluster's shared storage
    seen from a laptop): both come back as `unread_set`, so the plan still bills them. The run itself reads
    with neither, so a missing file is refused, naming its key, before any generation or training."""
    sets, problems = [], []
    ev, check, eval_size = spec.evaluation, spec.problems.answer_check, spec.problems.eval_size
    for index, eval_set in enumerate(ev.sets):
        if eval_set.path is not None:
            eval_set = eval_set.model_copy(update={"path": str((cwd or Path.cwd()) / eval_set.path)})
        if eval_set.source == "heldout" and heldout is None:
            sets.append(
                unread_set(eval_set, ev, check, eval_size, "cut from the training source at run time")
            )
        elif missing_ok and eval_set.path is not None and not Path(eval_set.path).exists():
            why = f"{eval_set.path} is not on this machine; the run reads and checks it before any training"
            sets.append(unread_set(eval_set, ev, check, eval_size, why))
        else:
            try:
                sets.append(read_set(eval_set, ev, check, heldout))
            except ValueError as error:
                problems.append(
                    f"evaluation.sets[{index}] ('{eval_set.name}'){_key_of(error, eval_set)}: {error}"
                )
    if problems:
        raise EvalSetError(problems)
    return sets


def write_sets_file(sets: list[EvalSet], path: str | Path) -> Path:
    """The sets as the trials read them (`read_sets_file`): one JSON file, problems included, written once
    on the driver, so a trial never re-reads a benchmark file from its own working directory."""
    from dataclasses import asdict

    from raykd.files import write_json_atomic

    return write_json_atomic(path, [asdict(s) for s in sets], sort_keys=False)


def read_sets_file(path: str | Path) -> list[EvalSet]:
    """The sets `write_sets_file` wrote."""
    import json

    from raykd.problems.tasks import Problem

    sets = []
    for saved in json.loads(Path(path).read_text()):
        saved["problems"] = [Problem(**p) for p in saved["problems"]]
        sets.append(EvalSet(**saved))
    return sets


def describe_sets(sets: list[EvalSet]) -> str:
    """Dry-run lines: each set's problems, samples and the most tokens it can generate per evaluated model;
    a set not read says why, and what its cost is counted from."""
    lines = []
    for s in sets:
        known = s.n_problems is not None
        note = f", {s.unparseable} reference answer(s) the check cannot parse" if s.unparseable else ""
        if s.missing:
            counted = "its size and limit" if s.source == "file" else "problems.eval_size"
            note += f"; not read: {s.missing}" + (
                f" (problems counted from {counted})" if known else "; give size: N to count its cost"
            )
        lines.append(
            f"eval set '{s.name}': {s.n_problems if known else 'unknown'} problems x {s.samples} samples x "
            f"{s.max_tokens:,} max tokens (check {s.check}, T={s.temperature:g}, top-p {s.top_p:g}), at most "
            f"{f'{s.max_completion_tokens:,}' if known else 'unknown'} tokens per model{note}"
        )
    return "\n".join(lines)


def _key_of(error: ValueError, spec: EvalSetSpec) -> str:
    """The spec key a file error points at: the field option that names the file's missing or bad field."""
    if isinstance(error, _KeyError):
        return error.key
    field = getattr(error, "field", None)
    if (
        field is None
    ):  # a file that cannot be read names no field; answers that do not parse are not in a file
        return ".path" if getattr(error, "path", None) else ".answer_field"
    prompt, answer = spec.fields()
    keys = {prompt: "prompt_field", answer: "answer_field", spec.id_field: "id_field"}
    keys |= {spec.choices_field: "choices_field"} | dict.fromkeys(_distractors(spec), "distractor_fields")
    return f".{keys[field]}" if field in keys else ".path"


def _distractors(spec: EvalSetSpec) -> list[str]:
    return list(spec.distractor_fields or GPQA_DISTRACTORS) if spec.layout == "gpqa" else []


def _unparseable(problems: list[Any], check: str) -> int:
    from raykd.problems.answers import is_correct

    # A reference that its own check cannot match to itself is one the check cannot read.
    return sum(not is_correct(p.answer, p.answer, check) for p in problems)  # type: ignore[arg-type]


def _read_file(spec: EvalSetSpec) -> list[Any]:
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
    choices = [correct] + [_field(path, row, record, f).strip() for f in _distractors(spec)]
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
