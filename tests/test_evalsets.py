"""Evaluation sets: the AIME, MATH-500 and GPQA layouts read from fixture files, per-set settings, and bad
input refused with the set and key named (in the spec, when reading, and by the dry run)."""

from __future__ import annotations

import copy
import string
from pathlib import Path
from typing import Any

import pytest
import yaml

from raykd.evalsets import EvalSetError, read_set, read_sets
from raykd.evalsets_layouts import choice_prompt
from raykd.evalsets_spec import EvalSetSpec
from raykd.problems.answers import extract_answer, is_correct
from raykd.spec import EvaluationSpec, SpecError, parse_spec

FIXTURES = Path(__file__).parent / "fixtures" / "evalsets"
EVAL = EvaluationSpec(samples=2, temperature=0.6, top_p=0.95, max_tokens=512)


def eval_set(**kw: Any) -> EvalSetSpec:
    return EvalSetSpec.model_validate({"name": "s"} | kw)


def test_aime_layout_with_numeric_answers_and_evaluation_defaults() -> None:
    got = read_set(eval_set(name="aime24", path=str(FIXTURES / "aime.jsonl")), EVAL, "exact")
    assert [p.answer for p in got.problems] == ["204", "25", "809"]  # numbers in the file become text
    assert [p.id for p in got.problems] == ["aime24-0", "aime24-1", "aime24-2"]
    assert got.problems[1].prompt.startswith("There exist real numbers x and y")
    assert (got.check, got.samples, got.temperature, got.top_p, got.max_tokens) == ("math", 2, 0.6, 0.95, 512)
    assert got.max_completion_tokens == 3 * 2 * 512 and got.unparseable == 0
    own_ids = read_set(eval_set(path=str(FIXTURES / "aime.jsonl"), id_field="id", limit=2), EVAL, "exact")
    assert [p.id for p in own_ids.problems] == ["2024-I-1", "2024-I-2"]


def test_math500_layout_from_parquet_and_a_saved_datasets_folder(tmp_path: Path) -> None:
    import datasets

    spec = eval_set(
        name="math500",
        path=str(FIXTURES / "math500.parquet"),
        id_field="unique_id",
        samples=4,
        temperature=0.0,
        max_tokens=32768,
    )
    got = read_set(spec, EVAL, "exact")
    assert [p.answer for p in got.problems] == ["\\left( 3, \\frac{\\pi}{2} \\right)", "\\frac{14}{3}", "4"]
    assert got.problems[0].id == "test/precalculus/807.json"
    assert (got.samples, got.temperature, got.top_p, got.max_tokens) == (4, 0.0, 0.95, 32768)
    folder = tmp_path / "math500"
    datasets.DatasetDict(
        {"test": datasets.Dataset.from_parquet(str(FIXTURES / "math500.parquet"))}
    ).save_to_disk(str(folder))
    from_folder = read_set(spec.model_copy(update={"path": str(folder), "split": "test"}), EVAL, "exact")
    assert from_folder.problems == got.problems


def letter_of(prompt: str, text: str) -> str:
    return next(line[0] for line in prompt.splitlines() if line[1:3] == ") " and line[3:] == text)


def test_gpqa_layout_letters_the_shuffled_choices_and_boxed_letters_score() -> None:
    spec = eval_set(name="gpqa", path=str(FIXTURES / "gpqa.jsonl"), layout="gpqa", id_field="Record ID")
    got = read_set(spec, EVAL, "exact")
    assert [p.id for p in got.problems] == ["rec1", "rec2"]
    first = got.problems[0]
    for text in ("-0.7", "0.85", "1.65", "-1.4"):
        assert any(line.endswith(f") {text}") for line in first.prompt.splitlines())
    assert first.answer == letter_of(first.prompt, "-0.7")  # the letter of the correct answer
    assert letter_of(got.problems[1].prompt, "Argon") == got.problems[1].answer
    assert first.prompt.endswith("Put the letter of the correct choice (A, B, C or D) in \\boxed{}.")
    assert read_set(spec, EVAL, "exact").problems == got.problems  # the same order every run
    wrong = next(c for c in "ABCD" if c != first.answer)
    assert is_correct(
        extract_answer(f"<think>x</think> \\boxed{{{first.answer}}}", "math"), first.answer, "math"
    )
    assert not is_correct(
        extract_answer(f"<think>x</think> \\boxed{{{wrong}}}", "math"), first.answer, "math"
    )


def test_choices_layout_takes_an_index_a_letter_or_the_text() -> None:
    spec = eval_set(path=str(FIXTURES / "choices.jsonl"), layout="choices", choices_field="choices")
    got = read_set(spec, EVAL, "exact")
    assert [p.answer for p in got.problems] == ["B", "B", "B"]
    assert got.problems[1].prompt == choice_prompt(
        "Which planet is closest to the Sun?", ["Venus", "Mercury", "Earth"]
    )
    assert "(A, B or C)" in got.problems[1].prompt and "C) Earth" in got.problems[1].prompt


def test_heldout_set_takes_the_split_and_the_problems_check() -> None:
    from raykd.problems.tasks import make_problems

    heldout = make_problems("cups", "eval", 5, seed=0)
    got = read_set(eval_set(name="heldout", source="heldout", max_tokens=64), EVAL, "exact", heldout)
    assert got.problems == heldout and (got.check, got.max_tokens, got.samples) == ("exact", 64, 2)


TINY = Path(__file__).parents[1] / "sweeps" / "tiny.yaml"


def spec_with_sets(*sets: dict[str, Any]) -> dict[str, Any]:
    """sweeps/tiny.yaml with these evaluation sets."""
    spec = yaml.safe_load(TINY.read_text())
    spec["evaluation"] = {"samples": 2, "max_tokens": 100, "sets": list(sets)}
    return spec


def spec_problems(*sets: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as error:
        parse_spec(spec_with_sets(*sets))
    return error.value.problems


def test_spec_rules_name_the_set_and_key() -> None:
    aime = {"name": "aime24", "path": "aime.jsonl"}
    [unknown] = spec_problems(aime | {"check": "fuzzy"})
    assert (
        unknown.startswith("evaluation.sets[0].check: 'fuzzy' is invalid") and "'exact' or 'math'" in unknown
    )
    [twice] = spec_problems(aime, {"name": "math500", "path": "m.parquet"}, aime)
    assert twice.startswith("evaluation.sets: ") and "'aime24' is used by sets 0 and 2" in twice
    [no_path] = spec_problems({"name": "x"})
    assert no_path.startswith("evaluation.sets[0]: set 'x': path is required")
    [heldout] = spec_problems({"name": "h", "source": "heldout", "path": "a.jsonl"})
    assert "source 'heldout'" in heldout and "drop path" in heldout
    [choices] = spec_problems({"name": "c", "path": "c.jsonl", "layout": "choices"})
    assert "needs choices_field" in choices
    [exact] = spec_problems({"name": "g", "path": "g.jsonl", "layout": "gpqa", "check": "exact"})
    assert "use check: math" in exact
    [uri] = spec_problems({"name": "u", "path": "s3://bucket/aime.jsonl"})
    assert "is a URI" in uri
    [typo] = spec_problems(aime | {"answer_feild": "a"})
    assert typo == "evaluation.sets[0].answer_feild: unknown key; did you mean 'answer_field'?"
    [name] = spec_problems({"name": "aime 24", "path": "a.jsonl"})
    assert name.startswith("evaluation.sets[0].name:")
    parsed = parse_spec(spec_with_sets(aime, {"name": "math500", "path": "m.parquet", "samples": 4}))
    assert [s.name for s in parsed.evaluation.sets] == ["aime24", "math500"]


def test_bad_files_are_reported_at_once_naming_set_and_key(tmp_path: Path) -> None:
    spec = parse_spec(
        spec_with_sets(
            {"name": "aime24", "path": str(FIXTURES / "aime.jsonl")},
            {"name": "short", "path": str(FIXTURES / "missing_answer.jsonl")},
            {"name": "shapes", "path": str(FIXTURES / "unparseable_answers.jsonl")},
            {"name": "gone", "path": str(tmp_path / "nowhere.jsonl")},
            {"name": "renamed", "path": str(FIXTURES / "aime.jsonl"), "prompt_field": "question"},
        )
    )
    with pytest.raises(EvalSetError) as error:
        read_sets(spec)
    short, shapes, gone, renamed = error.value.problems
    assert short.startswith("evaluation.sets[1] ('short').answer_field: ") and "row 1" in short
    assert shapes.startswith(
        "evaluation.sets[2] ('shapes').answer_field: none of the 2 reference answers parse"
    )
    assert gone.startswith("evaluation.sets[3] ('gone').path: ") and "no such file" in gone
    assert renamed.startswith("evaluation.sets[4] ('renamed').prompt_field: ") and "fields present" in renamed
    assert str(error.value).startswith("4 problem(s) with evaluation.sets")


def test_relative_paths_are_read_from_the_shell_directory(tmp_path: Path) -> None:
    spec = parse_spec(spec_with_sets({"name": "aime24", "path": "fixtures/evalsets/aime.jsonl"}))
    [got] = read_sets(spec, cwd=Path(__file__).parent)
    assert len(got.problems) == 3


def test_dry_run_prints_each_set_and_refuses_a_bad_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from raykd.sweep import main

    spec = spec_with_sets(
        {"name": "aime24", "path": str(FIXTURES / "aime.jsonl"), "samples": 4},
        {"name": "heldout", "source": "heldout"},
    )
    spec["output"] = {"dir": str(tmp_path / "out")}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "eval set 'aime24': 3 problems x 4 samples x 100 max tokens (check math" in out
    assert "at most 1,200 tokens per model" in out
    assert f"eval set 'heldout': {spec['problems']['eval_size']} problems x 2 samples" in out
    spec["evaluation"]["sets"][0]["path"] = str(FIXTURES / "missing_answer.jsonl")
    path.write_text(yaml.safe_dump(spec))
    assert main([str(path), "--dry-run"]) == 2
    assert "evaluation.sets[0] ('aime24').answer_field" in capsys.readouterr().err


def test_a_file_not_on_this_machine_is_noted_by_the_dry_run_and_refused_by_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from raykd.sweep import main

    gone = tmp_path / "shared" / "aime25.jsonl"
    spec = spec_with_sets(
        {"name": "aime25", "path": str(gone), "size": 30, "samples": 4},
        {"name": "unsized", "path": str(tmp_path / "shared" / "other.jsonl")},
    )
    spec["output"] = {"dir": str(tmp_path / "out")}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        f"eval set 'aime25': 30 problems x 4 samples x 100 max tokens (check math, T=0.6, top-p 0.95), at "
        f"most 12,000 tokens per model; not read: {gone} is not on this machine; the run reads and checks "
        "it before any training (problems counted from its size and limit)"
    ) in out
    assert "eval set 'unsized': unknown problems" in out and "give size: N to count its cost" in out
    with pytest.raises(EvalSetError) as error:  # what the run reads, before any generation or training
        read_sets(parse_spec(spec), heldout=[])
    missing, unsized = error.value.problems
    assert missing.startswith("evaluation.sets[0] ('aime25').path: ") and "no such file" in missing
    assert unsized.startswith("evaluation.sets[1] ('unsized').path: ")


def test_size_refuses_a_partial_file_and_bills_a_missing_one() -> None:
    aime = {"name": "aime24", "path": str(FIXTURES / "aime.jsonl")}
    with pytest.raises(EvalSetError) as error:
        read_sets(parse_spec(spec_with_sets(aime | {"size": 30})))
    [partial] = error.value.problems
    assert (
        partial.startswith("evaluation.sets[0] ('aime24').size: ")
        and "holds 3 problems, size says 30" in partial
    )
    [whole] = read_sets(parse_spec(spec_with_sets(aime | {"size": 3, "limit": 2})))
    assert len(whole.problems) == 2  # size checks the file, limit then takes the first problems
    [heldout] = spec_problems({"name": "h", "source": "heldout", "size": 5})
    assert "drop size" in heldout


def test_the_plan_bills_every_set_problems_x_samples_x_max_tokens() -> None:
    from raykd.evalsets import planned_sets
    from raykd.plan import ASSUMED, describe_plan, gpu_hours, make_plan

    grid = yaml.safe_load(GRID.read_text())
    spec = parse_spec(grid)
    plan = make_plan(spec)
    sets = planned_sets(spec)  # from the spec alone: the files are on the cluster's storage
    assert [(s.name, s.n_problems, s.samples) for s in sets] == [
        ("aime24", 30, 16), ("aime25", 30, 16), ("math500", 500, 4),
    ]  # fmt: skip
    tokens = sum(n * k * spec.evaluation.max_tokens for n, k in ((30, 16), (30, 16), (500, 4)))
    per_model = ASSUMED["eval_completion_fill"] * tokens / 3600
    cost = gpu_hours(spec, plan)
    assert cost["evaluation"] == pytest.approx(60 * per_model / ASSUMED["eval_tokens_per_s_per_gpu"])
    teacher, student = (
        per_model / ASSUMED["gen_tokens_per_s_per_gpu"],
        per_model / ASSUMED["eval_tokens_per_s_per_gpu"],
    )
    startups = 2 * ASSUMED["startup_h_per_job"]  # one engine per reference model serves every set
    assert cost["references"] == pytest.approx(teacher + student + startups)
    more = copy.deepcopy(grid)
    more["evaluation"]["sets"][2]["samples"] = 8  # twice MATH-500's samples: its share of the bill doubles
    more_cost = gpu_hours(parse_spec(more), plan)["evaluation"]
    math500 = 60 * ASSUMED["eval_completion_fill"] * 500 * 4 * spec.evaluation.max_tokens / 3600 / 6000.0
    assert more_cost - cost["evaluation"] == pytest.approx(math500)
    text = describe_plan(spec, plan)
    assert (
        "  evaluation on 'math500': 500 problems x 4 samples x 31,744 max tokens = 63,488,000 tokens" in text
    )
    plain = copy.deepcopy(grid)
    del plain["evaluation"]["sets"]  # no sets: the held-out problems, as before
    [heldout] = planned_sets(parse_spec(plain))
    assert (heldout.name, heldout.n_problems, heldout.samples) == ("heldout", 500, 16)


GRID = Path(__file__).parents[1] / "sweeps" / "grid.yaml"


def test_grid_evaluates_the_papers_benchmarks_on_shared_storage() -> None:
    spec = parse_spec(yaml.safe_load(GRID.read_text()))
    ev = spec.evaluation
    assert [s.name for s in ev.sets] == ["aime24", "aime25", "math500"]
    assert (ev.temperature, ev.top_p) == (0.6, 0.95) and ev.samples > 1  # pass@1 over several samples
    for s in ev.sets:
        assert s.path.startswith("/mnt/raykd/evals/") and s.size and s.temperature is None
        assert (s.samples or ev.samples) > 1 and (s.max_tokens or ev.max_tokens) >= 30_000
    # the student (Qwen3-1.7B-Base, 32,768 positions) holds the prompt and the longest completion
    assert ev.max_tokens + 1024 <= 32_768


def test_grid_dry_run_bills_each_set_without_its_files(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    run = subprocess.run(
        [sys.executable, "-m", "raykd.sweep", "sweeps/grid.yaml", "--dry-run"],
        capture_output=True, text=True, cwd=root, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    for name, n, k in (("aime24", 30, 16), ("aime25", 30, 16), ("math500", 500, 4)):
        assert f"  evaluation on '{name}': {n} problems x {k} samples x 31,744 max tokens" in run.stdout
        if not Path(f"/mnt/raykd/evals/{name}.jsonl").exists():
            assert f"eval set '{name}': {n} problems" in run.stdout and "is not on this machine" in run.stdout
    assert "references" in next(line for line in run.stdout.splitlines() if "estimated GPU-hours" in line)


def test_letters_cover_up_to_26_choices() -> None:
    prompt = choice_prompt("q", [str(i) for i in range(26)])
    assert prompt.splitlines()[-3].startswith("Z) ") and string.ascii_uppercase[-1] in prompt


EVALUATE_SETS = """
import json, sys
from raykd.evaluate import evaluate_sets
from raykd.evalsets import read_sets
from raykd.spec import parse_spec

if __name__ == "__main__":
    spec, model, tokenizer, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    sets = read_sets(parse_spec(spec))
    results = evaluate_sets(model, sets, tokenizer_dir=tokenizer, completions_dir=out)
    print("RESULT " + json.dumps({name: r.__dict__ for name, r in results.items()}))
"""


def write_layouts(tmp_path: Path, problems: list[Any]) -> tuple[Path, Path]:
    """Built-in task problems written in the AIME layout (JSONL, problem / answer) and the MATH-500 layout
    (Parquet, problem / answer / solution / unique_id): real layouts, questions the embedded model solves."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    aime = tmp_path / "aime_layout.jsonl"
    aime.write_text(
        "".join(json.dumps({"problem": p.prompt, "answer": p.answer}) + "\n" for p in problems[:6])
    )
    math500 = tmp_path / "math500_layout.parquet"
    rows = [
        {"problem": p.prompt, "answer": p.answer, "solution": "", "unique_id": f"test/cups/{i}.json"}
        for i, p in enumerate(problems[6:])
    ]
    pq.write_table(pa.Table.from_pylist(rows), math500)
    return aime, math500


@pytest.mark.slow
def test_sets_run_through_one_engine_and_match_a_recount_of_their_completions(
    tmp_path: Path, cache_dir: Path
) -> None:
    import json
    import statistics
    import subprocess
    import sys

    import pyarrow.parquet as pq

    from raykd.embedded.bootstrap import bootstrap
    from raykd.metrics import pass_at_k_one
    from raykd.problems.answers import extract_answer
    from raykd.problems.tasks import make_problems

    models = bootstrap("cups", 0, cache_dir / "embedded")
    aime, math500 = write_layouts(tmp_path, make_problems("cups", "eval", 10, seed=7))
    spec = spec_with_sets(
        {"name": "aime-layout", "path": str(aime), "check": "exact", "samples": 3, "temperature": 1.0,
         "max_tokens": 300},
        {"name": "math500-layout", "path": str(math500), "check": "exact", "id_field": "unique_id",
         "samples": 1, "temperature": 0.0, "max_tokens": 24},
    )  # fmt: skip
    script = tmp_path / "evaluate_sets.py"
    script.write_text(EVALUATE_SETS)
    args = [
        json.dumps(spec),
        str(models.teacher_dir),
        str(models.tokenizer_dir),
        str(tmp_path / "completions"),
    ]
    run = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, cwd=Path(__file__).parents[1],
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert (run.stdout + run.stderr).count("vLLM engine for") == 1  # one engine served both sets
    results = json.loads(next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))[7:])
    references = {
        "aime-layout": {
            f"aime-layout-{i}": json.loads(line)["answer"]
            for i, line in enumerate(aime.read_text().splitlines())
        },
        "math500-layout": {r["unique_id"]: r["answer"] for r in pq.read_table(math500).to_pylist()},
    }
    for name, n in (("aime-layout", 3), ("math500-layout", 1)):
        lines = (tmp_path / "completions" / f"{name}.jsonl").read_text().splitlines()
        stored = [json.loads(line) for line in lines]
        assert len(stored) == len(references[name]) * n
        by_problem: dict[str, list[bool]] = {}
        for row in stored:  # recount: the answer after the thinking, never one cut at max tokens
            answer = extract_answer(row["text"], "exact")
            ok = row["finish_reason"] != "length" and answer == references[name][row["id"]]
            by_problem.setdefault(row["id"], []).append(ok)
        per_problem = [sum(v) / n for v in by_problem.values()]
        got = results[name]
        assert (got["n_problems"], got["n_samples"]) == (len(references[name]), n)
        assert got["accuracy"] == pytest.approx(statistics.fmean(per_problem))
        assert got["stderr"] == pytest.approx(statistics.stdev(per_problem) / len(per_problem) ** 0.5)
        truncated = sum(r["finish_reason"] == "length" for r in stored) / len(stored)
        assert got["truncated_share"] == pytest.approx(truncated)
        if n > 1:
            by_hand = statistics.fmean(pass_at_k_one(n, sum(v), 2) for v in by_problem.values())
            assert got["pass_at_k"]["2"] == pytest.approx(by_hand)
    # 24 new tokens cut the greedy set's answers: its own max_tokens reached the engine, not the other's.
    assert results["math500-layout"]["truncated_share"] > results["aime-layout"]["truncated_share"]
    assert results["aime-layout"]["accuracy"] >= 0.5  # the teacher solves the task in the AIME layout


def test_sets_file_round_trip(tmp_path: Path) -> None:
    from raykd.evalsets import read_sets_file, write_sets_file

    spec = parse_spec(
        spec_with_sets(
            {"name": "aime24", "path": str(FIXTURES / "aime.jsonl"), "samples": 3},
            {"name": "gpqa", "path": str(FIXTURES / "gpqa.jsonl"), "layout": "gpqa"},
        )
    )
    sets = read_sets(spec)
    assert read_sets_file(write_sets_file(sets, tmp_path / "sets.json")) == sets


def test_sets_join_the_trial_settings_only_when_given() -> None:
    from raykd.identity import trial_settings
    from raykd.plan import make_plan

    plain = parse_spec(spec_with_sets())
    with_sets = parse_spec(spec_with_sets({"name": "aime24", "path": "aime.jsonl", "samples": 4}))
    trial = make_plan(plain).trials[0]
    assert not any(key.startswith("evaluation.sets") for key in trial_settings(plain, trial, {}))
    [saved] = trial_settings(with_sets, trial, {})["evaluation.sets"]
    assert (saved["name"], saved["samples"]) == (
        "aime24",
        4,
    )  # another set or its settings: another fingerprint


@pytest.mark.slow
def test_sweep_with_two_seeds_and_two_sets_reports_each_set_and_reruns_nothing(
    tmp_path: Path, cache_dir: Path
) -> None:
    import json

    from ray_head import reduced_tiny, run_sweep

    from raykd.problems.tasks import make_problems

    aime, _ = write_layouts(tmp_path, make_problems("cups", "eval", 10, seed=11))
    path = reduced_tiny(tmp_path, "sets", 64, 8, truncation=[1.0], segments=[["cot"]], seeds=[0, 1])
    spec = yaml.safe_load(path.read_text())
    spec["evaluation"]["sets"] = [
        {"name": "heldout", "source": "heldout"},
        {"name": "aime-layout", "path": str(aime), "check": "exact", "samples": 2, "temperature": 1.0},
    ]
    path.write_text(yaml.safe_dump(spec))
    first = run_sweep(path, cache_dir)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    out = tmp_path / "runs" / "sets"
    data = json.loads((out / "results.json").read_text())
    assert sorted((t["seed"], t["set"]) for t in data["trials"]) == [
        (0, "aime-layout"), (0, "heldout"), (1, "aime-layout"), (1, "heldout"),
    ]  # fmt: skip
    for trial in data["trials"]:
        assert trial["accuracy"] == trial["sets"][trial["set"]]["accuracy"]
        kept = (out / "trials" / trial["trial_id"] / "eval_completions" / f"{trial['set']}.jsonl").read_text()
        assert len(kept.splitlines()) == (8 if trial["set"] == "heldout" else 6 * 2)
    assert "2" in data["trials"][0]["sets"]["aime-layout"]["pass_at_k"]
    aggregates = {a["set"]: a for a in data["aggregates"]}
    assert aggregates["aime-layout"]["n_seeds"] == 2 and aggregates["heldout"]["retained_pct"] == 100.0
    table = (out / "results.md").read_text()
    assert "mean over seeds" in table and "| 1.00 | CoT | aime-layout | 2 |" in table
    # the teacher and the base student on every set, by the trials' evaluator, with its completions kept
    refs = data["references"]["sets"]
    assert sorted(refs) == ["aime-layout", "heldout"]
    for name, n in (("heldout", 8), ("aime-layout", 6 * 2)):
        for role in ("teacher", "student"):
            assert (refs[name][role]["n_problems"] * refs[name][role]["n_samples"]) == n
        row = f"| {name} | {refs[name]['teacher']['accuracy']:.3f} ± {refs[name]['teacher']['stderr']:.3f} | "
        assert row in table
    assert refs["aime-layout"]["teacher"]["accuracy"] >= 0.5  # the teacher solves the task it taught
    kept = json.loads((out / "references.json").read_text())["entries"]["teacher"]
    assert all(Path(p).with_suffix(".completions.jsonl").is_file() for p in kept)
    assert "reference teacher" in first.stdout and "(0 of 2 cached)" in first.stdout
    second = run_sweep(path, cache_dir)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "2 trial(s) already finished, 0 to run" in second.stdout
    assert second.stdout.count("(2 of 2 cached)") == 2  # teacher and student: no engine started
    assert json.loads((out / "results.json").read_text())["references"]["sets"] == refs
