"""Reference rows per evaluation set: the cache keyed by (model, set, settings) by content, a rerun that
measures nothing, and the per-set references in results.md, results.json and frontier.png (one panel per
set). The measurement itself (vLLM) runs in the slow sweep test of tests/test_evalsets.py."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from raykd import references
from raykd.evalsets import read_sets
from raykd.report import write_results
from raykd.report_plot import frontier_figure
from raykd.report_rows import References
from raykd.spec import parse_spec

FIXTURES = Path(__file__).parent / "fixtures" / "evalsets"
TINY = Path(__file__).parents[1] / "sweeps" / "tiny.yaml"
IDENTITY = {"teacher.model": "teacher-abc", "student.model": "student-def", "tokenizer": "tok-123"}


@dataclass(frozen=True)
class Models:
    """raykd.run.Models as references.measure reads it; folders that do not exist, so an evaluation that
    should not happen fails loudly (raykd.engine.checks.check_model_path) instead of passing quietly."""

    teacher_dir: str
    student_dir: str
    tokenizer_dir: str


def sweep_spec(tmp_path: Path, *sets: dict[str, Any]) -> Any:
    data = yaml.safe_load(TINY.read_text())
    data["evaluation"] = {"samples": 2, "max_tokens": 100, "sets": list(sets)}
    data["output"] = {"dir": str(tmp_path / "runs")}
    return parse_spec(data)


AIME = {"name": "aime24", "path": str(FIXTURES / "aime.jsonl"), "samples": 3}
MATH = {"name": "math500", "path": str(FIXTURES / "math500.parquet"), "id_field": "unique_id"}


def result(accuracy: float) -> dict[str, Any]:
    """An EvalResult as a dict (raykd.evaluate), as references.store takes it."""
    return {
        "accuracy": accuracy, "stderr": 0.05, "n_problems": 3, "n_samples": 3, "pass_at_k": {2: accuracy},
        "pass_at_k_stderr": {2: 0.01}, "truncated_share": 0.0, "counts": {"correct": 1},
    }  # fmt: skip


def cache_of(spec: Any) -> Path:
    return Path(spec.output.dir) / references.CACHE


def fill_cache(spec: Any, sets: list[Any], scores: dict[str, dict[str, float]]) -> None:
    """Entries as a measurement leaves them: scores[role][set]."""
    for role, by_name in scores.items():
        for eval_set in sets:
            key = references.entry_key(spec, role, IDENTITY, eval_set)
            references.store(cache_of(spec), key, eval_set.name, role, result(by_name[eval_set.name]))


def missing(spec: Any, role: str, sets: list[Any], identity: dict[str, str] = IDENTITY) -> list[str]:
    found = references.lookup(spec, role, identity, sets, cache_of(spec))
    return [name for name, value in found.items() if value is None]


def test_editing_one_set_misses_only_that_sets_entries(tmp_path: Path) -> None:
    spec = sweep_spec(tmp_path, AIME, MATH)
    sets = read_sets(spec)
    assert missing(spec, "teacher", sets) == ["aime24", "math500"]  # nothing measured yet
    fill_cache(
        spec, sets, {"teacher": {"aime24": 0.5, "math500": 0.7}, "student": {"aime24": 0.1, "math500": 0.2}}
    )
    assert missing(spec, "teacher", sets) == missing(spec, "student", sets) == []
    more_samples = sweep_spec(tmp_path, AIME | {"samples": 4}, MATH)
    assert missing(more_samples, "teacher", read_sets(more_samples)) == ["aime24"]
    fewer = sweep_spec(tmp_path, AIME | {"limit": 2}, MATH)  # other problems
    assert missing(fewer, "student", read_sets(fewer)) == ["aime24"]
    hotter = sweep_spec(tmp_path, AIME, MATH | {"temperature": 1.0})
    assert missing(hotter, "teacher", read_sets(hotter)) == ["math500"]
    other_student = IDENTITY | {"student.model": "student-xyz"}
    assert missing(spec, "student", sets, other_student) == ["aime24", "math500"]
    assert missing(spec, "teacher", sets, other_student) == []  # the teacher's entries still hold
    renamed = sweep_spec(tmp_path, AIME, MATH | {"name": "math-500"})  # its own ids: the same problems
    assert missing(renamed, "teacher", read_sets(renamed)) == []


def test_a_rerun_with_every_entry_cached_evaluates_nothing(tmp_path: Path) -> None:
    spec = sweep_spec(tmp_path, AIME, MATH)
    sets = read_sets(spec)
    fill_cache(
        spec, sets, {"teacher": {"aime24": 0.5, "math500": 0.7}, "student": {"aime24": 0.1, "math500": 0.2}}
    )
    out = tmp_path / "runs" / "tiny"
    models = Models(str(tmp_path / "no-teacher"), str(tmp_path / "no-student"), str(tmp_path / "no-tok"))
    refs = references.measure(spec, models, sets, [], out, IDENTITY)  # would fail if it evaluated
    assert (refs.teacher_accuracy, refs.student_base_accuracy) == (0.5, 0.1)  # the first set's
    assert refs.sets["math500"]["teacher"]["accuracy"] == 0.7
    assert refs.sets["math500"]["student"]["pass_at_k"] == {"2": 0.2}
    saved = json.loads((out / references.FILE).read_text())
    assert saved["sets"] == refs.sets and saved["teacher_accuracy"] == 0.5
    assert all(Path(p).is_file() for paths in saved["entries"].values() for p in paths)
    other = sweep_spec(tmp_path, AIME, MATH | {"samples": 5})
    with pytest.raises(Exception, match="no-teacher"):  # the edited set is measured again: no such model
        references.measure(other, models, read_sets(other), [], out, IDENTITY)


def test_without_sets_the_references_are_the_heldout_problems(tmp_path: Path) -> None:
    from raykd.problems.tasks import make_problems

    spec = sweep_spec(tmp_path)
    heldout = make_problems("cups", "eval", 4, seed=0)
    [one] = references.reference_sets(spec, [], heldout)
    assert (one.name, one.problems, one.check, one.samples, one.max_tokens) == (
        "heldout",
        heldout,
        "exact",
        2,
        100,
    )


def set_records() -> list[dict[str, Any]]:
    """Trial records as raykd.trial writes them with two sets, two seeds, two fractions."""
    records = []
    for f, accs in ((1.0, (0.4, 0.8)), (0.5, (0.3, 0.6))):
        for seed in (0, 1):
            sets = {
                name: {"accuracy": acc - 0.1 * seed, "stderr": 0.02, "pass_at_k": {}, "truncated_share": 0.0}
                for name, acc in zip(("aime24", "math500"), accs, strict=True)
            }
            records.append({
                "trial_id": f"f{f:.2f}_CoT_s{seed}", "fraction": f, "segments": "CoT", "seed": seed,
                "status": "ok", "accuracy": sets["aime24"]["accuracy"], "stderr": 0.02, "sets": sets,
                "kept_tokens": 1000 * f, "flops": 1e12 * f, "train_s": 100 * f,
            })  # fmt: skip
    return records


REFS = References(
    0.5,
    0.1,
    sets={
        "aime24": {"teacher": result(0.5) | {"stderr": 0.09}, "student": result(0.1)},
        "math500": {"teacher": result(0.7), "student": result(0.2)},
    },
)


def test_results_show_each_sets_references(tmp_path: Path) -> None:
    table = write_results(set_records(), tmp_path, REFS)
    assert "references: the teacher and the base student, by the same evaluator" in table
    assert "| set | teacher | student base |" in table
    assert "| aime24 | 0.500 ± 0.090 | 0.100 ± 0.050 |" in table
    assert "| math500 | 0.700 ± 0.050 | 0.200 ± 0.050 |" in table
    assert (tmp_path / "results.md").read_text() == table + "\n"
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["references"]["sets"]["math500"]["teacher"]["accuracy"] == 0.7
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["set"] for r in rows} == {"aime24", "math500"}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_frontier_has_one_panel_per_set_with_that_sets_references(tmp_path: Path) -> None:
    from raykd.report_rows import by_set, complete_rows
    from raykd.report_seeds import aggregate_rows

    records = set_records()
    rows = complete_rows(by_set(records))
    fig = frontier_figure(rows, REFS, aggregate_rows(by_set(records)))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "Accuracy against compute, by supervised segments: aime24",
        "Accuracy against compute, by supervised segments: math500",
    ]
    for ax, (teacher, student, top) in zip(
        fig.axes, ((0.5, 0.1, 0.4 - 0.05), (0.7, 0.2, 0.8 - 0.05)), strict=True
    ):
        flat = {
            line.get_label(): line.get_ydata() for line in ax.get_lines() if line.get_label() in REFERENCE
        }
        assert flat["teacher"][0] == pytest.approx(teacher) and flat["student base"][0] == pytest.approx(
            student
        )
        [mask] = [bars for bars in ax.containers if bars.get_label() == "CoT"]  # an errorbar line
        assert max(mask.lines[0].get_ydata()) == pytest.approx(
            top
        )  # the mean over seeds of that set at f = 1.0
    plain = frontier_figure(
        complete_rows(by_set([{**r, "sets": None} for r in records])), References(0.9, 0.3)
    )
    [ax] = plain.axes  # no sets: one panel, the held-out references
    assert {line.get_label() for line in ax.get_lines()} >= {"teacher", "student base"}


REFERENCE = ("teacher", "student base")
