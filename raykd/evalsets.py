"""Named evaluation sets (`evaluation.sets` in the spec): benchmark files such as AIME, MATH-500 or
GPQA-Diamond, or the held-out split of the training problems, each with its own answer check and sampling.

A set names a local JSONL or Parquet file or a `datasets.save_to_disk` folder (on a cluster, shared storage)
in one of three layouts (raykd.evalsets_layouts reads them). Reading a set checks every row
(`raykd.problems.sources`) and that the reference answers parse for the set's check; errors name
``evaluation.sets[i]``, the set and key. A set's spec entry is raykd.evalsets_spec.EvalSetSpec.

Light: pydantic at import, the readers import what a file needs when it is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raykd.evalsets_layouts import read_problems
from raykd.evalsets_spec import EvalSetSpec


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
        problems, check = read_problems(spec), spec.check or "math"
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
    keys |= {spec.choices_field: "choices_field"} | dict.fromkeys(spec.distractors(), "distractor_fields")
    return f".{keys[field]}" if field in keys else ".path"


def _unparseable(problems: list[Any], check: str) -> int:
    from raykd.problems.answers import is_correct

    # A reference that its own check cannot match to itself is one the check cannot read.
    return sum(not is_correct(p.answer, p.answer, check) for p in problems)  # type: ignore[arg-type]
