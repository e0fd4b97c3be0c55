"""The teacher's and the base student's accuracy on the held-out problems: the lines a trained student is read
against in results.md and frontier.png.

The embedded pair measures them when it is built. For hub or folder models the driver measures them once per
output folder, under the rules every trained student is evaluated by (`raykd.evaluate.evaluate_student`):
prompts rendered with the teacher's chat template, sampling that stops on its end-of-turn token and on the
model's own EOS, the spec's evaluation settings and answer check. A base student without a template is
rendered with the teacher's, as its trained copies are. The figures are kept in ``<output>/references.json``
with what they were measured on, so a resumed sweep reuses them and a change of models, problems or
evaluation settings measures them again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raykd.files import write_json_atomic

FILE = "references.json"


def measure(
    spec: Any, models: Any, eval_problems: list[Any], out: Path, identity: dict[str, str]
) -> tuple[float, float]:
    """(teacher accuracy, base student accuracy) on ``eval_problems``; ``identity`` is the run's shared
    identity (raykd.identity.run_identity: models and held-out problems by content)."""
    key = {
        # the models and the held-out problems; not the traces, which only the trained students see
        "identity": {name: value for name, value in identity.items() if name != "traces.key"},
        "evaluation": spec.evaluation.model_dump(mode="json"),
        "answer_check": spec.problems.answer_check,
    }
    path = out / FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["teacher_accuracy"], saved["student_accuracy"]
    tokenizer = models.tokenizer_dir  # the teacher's: its template renders every prompt
    teacher = _accuracy(
        spec, "teacher", models.teacher_dir, tokenizer, eval_problems, out / "teacher_eval.log"
    )
    student = _accuracy(
        spec, "student", models.student_dir, tokenizer, eval_problems, out / "student_eval.log"
    )
    write_json_atomic(path, {"key": key, "teacher_accuracy": teacher, "student_accuracy": student})
    return teacher, student


def _accuracy(
    spec: Any, role: str, model_dir: str, tokenizer_dir: str, problems: list[Any], log: Path
) -> float:
    from raykd.evaluate import evaluate_student

    result = evaluate_student(
        model_dir,
        problems,
        spec.evaluation,
        spec.problems.answer_check,
        tokenizer_dir=tokenizer_dir,
        gpus=min(1, spec.generation.gpus_per_engine),
        resources=spec.generation.engine_resources,
        trust_remote_code=getattr(spec, role).trust_remote_code,  # the evaluated model's own flag
        log_file=str(log),
    )
    print(
        f"[raykd] reference {model_dir}: accuracy {result.accuracy:.3f} ({result.counts}, "
        f"{result.end_of_turn}/{sum(result.counts.values())} ended at the end-of-turn token)",
        flush=True,
    )
    return result.accuracy
