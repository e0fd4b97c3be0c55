"""The `evaluation.sets` entry of the spec: one named set, its source, layout, fields and sampling, with
the rules between them (raykd.spec_sections gathers the sets into the `evaluation` section).

Light: pydantic only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

LAYOUTS = ("problem_answer", "gpqa", "choices")
# (prompt_field, answer_field) when the spec leaves them out, per layout.
DEFAULT_FIELDS = {
    "problem_answer": ("problem", "answer"),
    "gpqa": ("Question", "Correct Answer"),
    "choices": ("question", "answer"),
}
GPQA_DISTRACTORS = ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


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

    def distractors(self) -> list[str]:
        """The fields of the wrong answers: those named, else GPQA's own (layout gpqa; none otherwise)."""
        return list(self.distractor_fields or GPQA_DISTRACTORS) if self.layout == "gpqa" else []


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
