"""Build (or reuse from cache) the embedded default: tokenizer, teacher and student base for a built-in task.

- teacher: a Llama model trained on the task's full verbose chains until greedy decoding solves held-out
  problems (checked cheaply with teacher-forced exact match, a lower bound on greedy accuracy);
- student base: a smaller Llama model (fewer layers, same vocabulary) pretrained on the same problems with
  worked solutions of which only a ``right_share`` (a quarter) are right; the rest reason with one systematic
  slip (`raykd.problems.tasks.sloppy_completion`), as a base model pretrained on mostly sloppy worked
  solutions from the web would. It knows the format, the length of the chains and how to finish an answer,
  and when decoding greedily it follows the common, sloppy way; so it sits well below the teacher and
  distillation has room to show. The right way is already in its weights, which is what lets the first part
  of a trace (a truncated one) tip it over, as in the paper; a base pretrained on shorter chains instead
  never learned to continue a chain past what a truncated trace shows (measured: it lost its ending).

Everything lands in ``cache_dir/<task>-<key>/`` where the key hashes every input (task, knobs, seed, sizes,
schedules, this code), written into a temporary folder and renamed, so a crash leaves nothing half-written
and a second run (or a concurrent one, which waits on a lock) reuses it.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raykd.embedded.recipe import ModelSize, Recipe, new_llama
from raykd.files import build_once
from raykd.problems.answers import extract_answer
from raykd.problems.tasks import (
    Problem,
    make_problems,
    reference_completion,
    resolve_knobs,
    sloppy_completion,
)

INFO_FILE = "embedded.json"
_SOURCES = (
    "problems/tasks.py",
    "embedded/tokenizer.py",
    "embedded/train.py",
    "embedded/recipe.py",
    "embedded/bootstrap.py",
)


@dataclass(frozen=True)
class EmbeddedModels:
    """The three artifacts and their measured greedy accuracy on the task's held-out eval split."""

    tokenizer_dir: Path
    teacher_dir: Path
    student_dir: Path
    teacher_accuracy: float
    student_accuracy: float
    info: dict[str, Any] = field(default_factory=dict)


TEACHER = ModelSize(layers=4)
STUDENT = ModelSize(layers=2)
# modchain's 4-layer teacher needs longer: 600 steps left it at 91% greedy (operands of late steps misread).
# (A 400-step cosine for cups, stopping at 0.95, was tried: it left the teacher at 0.59 greedy, 400 steps.
# Stopping the 600-step cosine at a check of 0.96 was tried too: it stopped at step 400 with the same greedy
# accuracy, 0.984, but its sampled traces taught less: f = 0.5 CoT kept 81% of f = 1.0, against 94%.)
TEACHER_RECIPES = {"cups": Recipe(max_steps=600), "modchain": Recipe(max_steps=1000)}
# The student base trains for all its steps (target > 1): a mixture has no exact-match score to stop at.
STUDENT_RECIPE = Recipe(max_steps=300, target=2.0)
RIGHT_SHARE = 0.25


def bootstrap(
    task: str,
    seed: int,
    cache_dir: str | Path,
    *,
    teacher: ModelSize = TEACHER,
    student: ModelSize = STUDENT,
    teacher_recipe: Recipe | None = None,
    student_recipe: Recipe = STUDENT_RECIPE,
    right_share: float = RIGHT_SHARE,
    n_eval: int = 256,
    n_check: int = 128,
    threads: int | None = None,
    log: Callable[[str], None] = print,
    **knobs: int,
) -> EmbeddedModels:
    """The embedded models for ``task``, built on the first call and read from ``cache_dir`` afterwards.

    ``knobs`` are the task's difficulty knobs, as for ``make_problems`` (cups / modulus, steps).
    ``teacher_recipe`` defaults to the task's entry in TEACHER_RECIPES.
    ``right_share``: the share of right worked solutions in the student base's pretraining (the rest sloppy).
    ``n_eval`` held-out problems measure the accuracies; ``n_check`` others decide when training may stop.
    ``threads`` defaults to the cores this process may use.
    """
    resolved = resolve_knobs(task, **knobs)
    teacher_recipe = teacher_recipe or TEACHER_RECIPES[task]
    inputs = {
        "task": task,
        "knobs": resolved,
        "seed": seed,
        "teacher": dataclasses.asdict(teacher),
        "student": dataclasses.asdict(student),
        "teacher_recipe": dataclasses.asdict(teacher_recipe),
        "student_recipe": dataclasses.asdict(student_recipe),
        "right_share": right_share,
        "n_eval": n_eval,
        "n_check": n_check,
        "code": code_version(),
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    final = cache_dir / f"{task}-{key}"
    # A concurrent bootstrap of the same key waits on build_once's lock, then reuses the folder.
    build = functools.partial(_build, inputs=inputs, threads=threads, log=log)
    if not build_once(final, build, marker=INFO_FILE):
        log(f"embedded models for {task} (seed {seed}) reused from {final}")
    return load(final)


def load(folder: str | Path) -> EmbeddedModels:
    """The EmbeddedModels of a finished cache folder."""
    folder = Path(folder)
    info = json.loads((folder / INFO_FILE).read_text())
    return EmbeddedModels(
        tokenizer_dir=folder / "tokenizer",
        teacher_dir=folder / "teacher",
        student_dir=folder / "student",
        teacher_accuracy=info["teacher"]["accuracy"],
        student_accuracy=info["student"]["accuracy"],
        info=info,
    )


def code_version() -> str:
    """Hash of the code that decides what gets built, so a change to it invalidates the cache: the files of
    _SOURCES and the prompt renderer (raykd.chat changes for other reasons; only this function matters)."""
    from raykd.chat import chat_prompt_ids

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update(_code_only((root / name).read_text()).encode())
    digest.update(_code_only(inspect.getsource(chat_prompt_ids)).encode())
    return digest.hexdigest()[:16]


def _code_only(source: str) -> str:
    """The syntax tree of ``source`` without docstrings (ast drops comments and line numbers), so editing
    documentation does not force a ~7 minute rebuild of the models."""
    tree = ast.parse(textwrap.dedent(source))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and _is_docstring(body[0]):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def _is_docstring(statement: ast.stmt) -> bool:
    return (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Constant)
        and isinstance(statement.value.value, str)
    )


def _build(folder: Path, inputs: dict[str, Any], threads: int | None, log: Callable[[str], None]) -> None:
    import torch
    from transformers import AutoTokenizer

    from raykd.embedded.tokenizer import build_tokenizer

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        task, seed, knobs = inputs["task"], inputs["seed"], inputs["knobs"]
        tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(folder / "tokenizer"))
        problems = make_problems(task, "eval", inputs["n_eval"] + inputs["n_check"], seed, **knobs)
        check_set, eval_set = problems[: -inputs["n_eval"]], problems[-inputs["n_eval"] :]
        shape = sequence_shape(tokenizer, eval_set)
        max_new = int(shape["completion_max"] * 1.25) + 8
        trained = {}
        for role, seed_offset in (("teacher", 0), ("student", 1)):
            train_set = make_problems(
                task, "train", _n_train(inputs[f"{role}_recipe"]), seed + seed_offset, **knobs
            )
            trained[role] = _train_model(
                folder / role, tokenizer, role, train_set, check_set, eval_set, max_new, inputs, log
            )
        teacher, student = trained["teacher"], trained["student"]
        info = {
            **inputs,
            "teacher": teacher,
            "student": student,
            "sequence": shape,
            "max_new_tokens": max_new,
            "n_eval": len(eval_set),
            "bootstrap_seconds": round(time.perf_counter() - start, 1),
            "bootstrap_cpu_seconds": round(time.process_time() - cpu_start, 1),
            "threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
        }
        (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")  # last: marks the build finished
        log(
            f"embedded {task}: teacher {teacher['accuracy']:.3f}, student base {student['accuracy']:.3f} "
            f"(greedy, {len(eval_set)} held-out problems), {info['bootstrap_seconds']:.0f}s"
        )
    finally:
        torch.set_num_threads(previous_threads)


def _train_model(
    out: Path,
    tokenizer: Any,
    role: str,
    train_problems: list[Problem],
    check_problems: list[Problem],
    eval_problems: list[Problem],
    max_new: int,
    inputs: dict[str, Any],
    log: Callable[[str], None],
) -> dict[str, Any]:
    import torch

    from raykd.embedded import train as t

    recipe = Recipe(**inputs[f"{role}_recipe"])
    size = ModelSize(**inputs[role])
    examples = [t.encode(tokenizer, p, text) for p, text in _pretraining_texts(role, train_problems, inputs)]
    checks = [t.encode(tokenizer, p, reference_completion(p)) for p in check_problems]
    torch.manual_seed(inputs["seed"])
    model = new_model(size, tokenizer)
    stats = t.train(
        model,
        examples,
        recipe,
        tokenizer.pad_token_id,
        inputs["seed"],
        check=lambda m: t.forced_exact(m, checks, tokenizer.pad_token_id),
        log=lambda line: log(f"{role}: {line}"),
    )
    started = time.perf_counter()
    completions = t.greedy_completions(model, tokenizer, eval_problems, max_new)
    answers = [extract_answer(c, "exact") for c in completions]
    accuracy = _share(a == p.answer for a, p in zip(answers, eval_problems, strict=True))
    # How often greedy decoding follows the sloppy slip: shows the student base reasons the common wrong way.
    sloppy = _share(a == sloppy_completion(p)[1] for a, p in zip(answers, eval_problems, strict=True))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)  # each model folder loads on its own, as a hub checkpoint would
    log(
        f"{role}: greedy accuracy {accuracy:.3f} on {len(eval_problems)} held-out problems; "
        f"answers as the sloppy slip gives {sloppy:.3f}"
    )
    parameters = sum(p.numel() for p in model.parameters())
    return {
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()},
        "accuracy": accuracy,
        "sloppy_agreement": sloppy,
        "eval_seconds": round(time.perf_counter() - started, 1),
        "parameters": parameters,
    }


def new_model(size: ModelSize, tokenizer: Any) -> Any:
    """A freshly initialised float32 Llama model for ``tokenizer``'s vocabulary, servable by vLLM on CPU."""
    if size.hidden % size.heads or size.hidden // size.heads < 32:
        raise ValueError(f"{size}: hidden / heads must be a whole number >= 32 (vLLM CPU attention)")
    return new_llama(size, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, max_positions=1024)


def sequence_shape(tokenizer: Any, problems: list[Problem]) -> dict[str, float]:
    """Token counts of the reference traces and the P / CoT / A proportions (``<think>`` tags count as CoT).

    Prompt = the chat-formatted prompt up to and including the assistant header; answer = everything after
    ``</think>``, the end-of-turn token included.
    """
    from raykd.embedded import train as t

    close = tokenizer.convert_tokens_to_ids("</think>")
    totals = {"prompt": 0, "cot": 0, "answer": 0}
    lengths, completions = [], []
    for problem in problems:
        example = t.encode(tokenizer, problem, reference_completion(problem))
        completion = example.ids[example.n_prompt :]
        answer = len(completion) - completion.index(close) - 1
        totals["prompt"] += example.n_prompt
        totals["cot"] += len(completion) - answer
        totals["answer"] += answer
        lengths.append(len(example.ids))
        completions.append(len(completion))
    tokens = sum(totals.values())
    return {
        **{f"{name}_share": round(count / tokens, 4) for name, count in totals.items()},
        **{f"{name}_mean": round(count / len(problems), 1) for name, count in totals.items()},
        "length_mean": round(sum(lengths) / len(lengths), 1),
        "length_max": max(lengths),
        "completion_max": max(completions),
    }


def _pretraining_texts(
    role: str, problems: list[Problem], inputs: dict[str, Any]
) -> list[tuple[Problem, str]]:
    """The teacher learns every problem's reference chain; the student base a seeded mix of right and sloppy
    ones (``right_share`` right)."""
    import random

    if role == "teacher":
        return [(p, reference_completion(p)) for p in problems]
    rng = random.Random(inputs["seed"])
    return [
        (p, reference_completion(p) if rng.random() < inputs["right_share"] else sloppy_completion(p)[0])
        for p in problems
    ]


def _share(flags: Any) -> float:
    flags = list(flags)
    return sum(flags) / max(1, len(flags))


def _n_train(recipe: dict[str, Any]) -> int:
    return recipe["max_steps"] * recipe["batch_size"]


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
