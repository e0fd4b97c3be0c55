"""The sweep spec: one YAML file mapped onto typed models, validated once, every error reported at once.

Every field carries a description; `python -m raykd.sweep --spec-help` prints them all. Unknown keys are
errors (with a did-you-mean), values are never repaired silently (strict types: "0.5" is not a number).
The sections are in `raykd.spec_sections`; this module puts them together, holds the rules across sections,
and loads, reports and resolves. It imports only pydantic, yaml and numpy, so `--dry-run` stays light.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from raykd.grid import SEGMENT_SHORT
from raykd.spec_sections import (
    DIVERGENCES,
    SEGMENT_NAMES,
    TRUNCATION_POLICIES,
    AnswerCheck,
    Divergence,
    EvaluationSpec,
    GenerationSpec,
    KDSpec,
    LossSpec,
    ModelSpec,
    OutputSpec,
    ProblemsSpec,
    ResourcesSpec,
    Section,
    SweepAxes,
    TrainingSpec,
)

__all__ = [
    "DIVERGENCES",
    "SEGMENT_NAMES",
    "SEGMENT_SHORT",
    "TRUNCATION_POLICIES",
    "AnswerCheck",
    "Divergence",
    "EvaluationSpec",
    "GenerationSpec",
    "KDSpec",
    "LossSpec",
    "ModelSpec",
    "OutputSpec",
    "ProblemsSpec",
    "ResourcesSpec",
    "Section",
    "SpecError",
    "SweepAxes",
    "SweepSpec",
    "TrainingSpec",
    "field_help",
    "load_spec",
    "parse_spec",
    "resolve_paths",
]


class SpecError(Exception):
    """A spec that cannot be used; `problems` lists every finding as 'key.path: what is wrong; fix'."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


class SweepSpec(Section):
    name: str = Field(description="Name of the study; results go under output.dir/<name>.")
    problems: ProblemsSpec = Field(default_factory=ProblemsSpec, description="Training and eval problems.")
    teacher: ModelSpec = Field(description="The teacher model that writes the traces.")
    student: ModelSpec = Field(description="The student base model that is distilled.")
    generation: GenerationSpec = Field(
        default_factory=GenerationSpec, description="Teacher trace generation."
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="KD training of each trial.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Student evaluation.")
    sweep: SweepAxes = Field(description="The grid: axes and concurrency.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Resources per trial.")
    output: OutputSpec = Field(description="Output and storage location.")

    @model_validator(mode="after")
    def _embedded_pairs(self) -> SweepSpec:
        embedded = (self.teacher.model == "embedded", self.student.model == "embedded")
        if any(embedded) and self.problems.source != "builtin":
            raise ValueError("teacher/student 'embedded' models exist only for problems.source: builtin")
        if embedded[0] != embedded[1]:
            raise ValueError(
                "teacher.model and student.model must both be 'embedded' or both be real models "
                "(the embedded pair shares a locally built vocabulary)"
            )
        return self

    @model_validator(mode="after")
    def _batch_splits_over_workers(self) -> SweepSpec:
        t, workers = self.training, self.resources.workers_per_trial
        per_pass = workers if t.micro_batch_tokens else t.micro_batch_size * workers
        fits = -(-t.batch_size // per_pass) * per_pass
        if t.batch_size % per_pass:
            what = (
                f"resources.workers_per_trial ({workers})"
                if t.micro_batch_tokens
                else f"training.micro_batch_size x resources.workers_per_trial ({t.micro_batch_size} x "
                f"{workers} = {per_pass})"
            )
            raise ValueError(
                f"training.batch_size: {t.batch_size} is not a multiple of {what}; every worker takes the "
                f"same share of a step, so use a multiple of {per_pass} (e.g. {fits})"
            )
        return self


# --- loading and error formatting -------------------------------------------------------------------------


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The section model a field holds: the model itself, or the item model of a list (evaluation.sets)."""
    if get_origin(annotation) is list:
        annotation = get_args(annotation)[0]
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = SweepSpec
    for part in loc[:-1]:
        if isinstance(part, int):  # the index of a list item: the model stays the item's
            continue
        field = model.model_fields.get(str(part)) if model else None
        model = _section_of(field.annotation) if field else None
    return model


def _describe(err: dict[str, Any]) -> str:
    loc, kind, value = err["loc"], err["type"], err.get("input")
    where = _loc(loc) or "(top level)"
    if kind == "extra_forbidden":
        model = _model_at(loc)
        names = list(model.model_fields) if model else []
        hint = difflib.get_close_matches(str(loc[-1]), names, n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"allowed keys: {', '.join(names)}"
        return f"{where}: unknown key; {fix}"
    if kind == "missing":
        field = _model_at(loc)
        desc = field.model_fields[str(loc[-1])].description if field else ""
        return f"{where}: required but missing; {desc}"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "value_error":  # a rule across sections names its keys itself
        return f"{where}: {msg}" if loc else msg
    return f"{where}: {value!r} is invalid: {msg}"


def parse_spec(data: Any, source: str = "<spec>") -> SweepSpec:
    """Validate a loaded YAML mapping; raise SpecError listing every problem found."""
    if not isinstance(data, dict):
        raise SpecError(source, [f"the file must hold a YAML mapping of sections, not {type(data).__name__}"])
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(source, [_describe(err) for err in e.errors()]) from None


def load_spec(path: str | Path) -> SweepSpec:
    """Read a sweep spec with a safe YAML loader and validate it; SpecError names every problem."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), [f"no such file: {path}; give the path to a sweep YAML (see sweeps/)"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(
            str(path), [f"not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"]
        ) from None
    if not text.strip():
        raise SpecError(str(path), ["the file is empty; see sweeps/tiny.yaml for a complete example"])
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(str(path), [f"not valid YAML{where}: {problem}"]) from None
    return resolve_paths(parse_spec(data, str(path)))


def _absolute(path: str, cwd: Path) -> str:
    return str((cwd / Path(path).expanduser()).resolve())


def _local_model(model: str, cwd: Path) -> str:
    """A model that names an existing folder becomes its absolute path; anything else is left for the hub."""
    if model == "embedded" or not (cwd / Path(model).expanduser()).is_dir():
        return model
    return _absolute(model, cwd)


def resolve_paths(spec: SweepSpec, cwd: Path | None = None) -> SweepSpec:
    """Every user path made absolute against the shell's working directory, once, on the driver.

    A Ray Tune trial runs in a working directory of its own (its artifact folder) and a job submitted with
    `ray job submit --working-dir` runs in an unpacked copy of that folder: a relative path handed to either
    would name a different place. So nothing relative leaves the driver.
    """
    cwd = cwd or Path.cwd()
    update: dict[str, Any] = {
        "output": spec.output.model_copy(update={"dir": _absolute(spec.output.dir, cwd)})
    }
    if spec.problems.path is not None:
        update["problems"] = spec.problems.model_copy(update={"path": _absolute(spec.problems.path, cwd)})
    for role in ("teacher", "student"):
        model: ModelSpec = getattr(spec, role)
        update[role] = model.model_copy(update={"model": _local_model(model.model, cwd)})
    return spec.model_copy(update=update)


def field_help(model: type[BaseModel] = SweepSpec, prefix: str = "") -> list[str]:
    """One line per field, `key.path (type, default): description`, for --spec-help."""
    lines = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        key = f"{prefix}{name}"
        section = _section_of(ann)
        if section is not None:
            lines.append(f"{key}: {field.description}")
            lines.extend(field_help(section, key + ("[]." if section is not ann else ".")))
            continue
        default = (
            "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
        )
        type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        lines.append(f"{key} ({type_name}, {default}): {field.description}")
    return lines
