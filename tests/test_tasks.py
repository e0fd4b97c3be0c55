"""Built-in tasks: deterministic, disjoint splits, answers that follow from the prompt, chains that reach
them."""

from __future__ import annotations

import re

import pytest

from raykd.problems.tasks import (
    TASKS,
    Problem,
    make_problems,
    reference_completion,
    resolve_knobs,
    sloppy_completion,
    space_size,
    split_of,
    task_of,
)


def _solve_cups(prompt: str) -> str:
    # Independent of the task code: read the numbers back and simulate the cups as a list.
    numbers = [int(x) for x in re.findall(r"\d+", prompt)]
    cups, ball, swaps = numbers[0], numbers[1], numbers[2:]
    row = [c == ball for c in range(1, cups + 1)]
    for index in range(0, len(swaps), 3):
        a, b = swaps[index + 1] - 1, swaps[index + 2] - 1
        row[a], row[b] = row[b], row[a]
    return str(row.index(True) + 1)


def _solve_modchain(prompt: str) -> str:
    start, modulus = (int(x) for x in re.match(r"start at (\d+) , modulo (\d+)", prompt).groups())
    value = start
    for op, operand in re.findall(r"(plus|minus|times) (\d+)", prompt):
        value = {"plus": value + int(operand), "minus": value - int(operand), "times": value * int(operand)}[
            op
        ]
    return str(value % modulus)


SOLVERS = {"cups": _solve_cups, "modchain": _solve_modchain}


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_problems(task: str) -> None:
    assert make_problems(task, "train", 50, seed=3) == make_problems(task, "train", 50, seed=3)
    assert make_problems(task, "train", 50, seed=3) != make_problems(task, "train", 50, seed=4)
    # A longer list starts with the shorter one: n does not change which problems a seed gives.
    assert make_problems(task, "eval", 80, seed=3)[:20] == make_problems(task, "eval", 20, seed=3)


@pytest.mark.parametrize("task", TASKS)
def test_splits_disjoint_across_seeds(task: str) -> None:
    train = {p.prompt for seed in range(3) for p in make_problems(task, "train", 400, seed)}
    held_out = {p.prompt for seed in range(3) for p in make_problems(task, "eval", 400, seed)}
    assert not train & held_out
    assert all(split_of(prompt) == "train" for prompt in train)


@pytest.mark.parametrize("task", TASKS)
def test_disjoint_even_when_the_space_is_small(task: str) -> None:
    knobs = {"steps": 1, "cups": 3} if task == "cups" else {"steps": 1, "modulus": 5}
    size = space_size(task, **knobs)
    train = make_problems(task, "train", size // 2, 0, **knobs)
    held_out = make_problems(task, "eval", 2, 0, **knobs)
    assert len({p.prompt for p in train}) == size // 2
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}


def test_asking_for_more_than_the_split_holds_raises() -> None:
    with pytest.raises(ValueError, match="fewer than 1000 distinct eval problems"):
        make_problems("cups", "eval", 1000, 0, cups=3, steps=1)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("knobs", [{}, {"steps": 3}, {"steps": 12}])
def test_answers_match_an_independent_solver(task: str, knobs: dict[str, int]) -> None:
    for problem in make_problems(task, "train", 200, seed=1, **knobs):
        assert problem.answer == SOLVERS[task](problem.prompt), problem


def test_difficulty_knobs_show_in_the_prompt() -> None:
    (cups,) = make_problems("cups", "train", 1, 0, cups=7, steps=3)
    assert cups.prompt.startswith("cups 7 ,") and cups.prompt.endswith(
        tuple(f"3 ) {a} {b}" for a in range(1, 8) for b in range(1, 8))
    )
    (chain,) = make_problems("modchain", "train", 1, 0, modulus=13, steps=5)
    assert ", modulo 13 ." in chain.prompt and chain.prompt.count(")") == 5
    assert 0 <= int(chain.answer) < 13


@pytest.mark.parametrize("task", TASKS)
def test_reference_chain_restates_each_step_and_ends_in_the_answer(task: str) -> None:
    problem = make_problems(task, "eval", 1, seed=5, steps=6)[0]
    text = reference_completion(problem)
    assert text.startswith("<think> step 1 : ") and text.count("</think>") == 1
    assert text.endswith(f"</think> {problem.answer}")
    assert [int(s) for s in re.findall(r"step (\d+) :", text)] == [1, 2, 3, 4, 5, 6]
    # The chain's last stated value is the answer, so the chain carries the reasoning.
    last = re.findall(r"(?:under cup|is) (-?\d+) \.", text)[-1]
    assert last == problem.answer


def test_exact_cups_text() -> None:
    (problem,) = make_problems("cups", "train", 1, seed=0, cups=3, steps=2)
    ball = problem.prompt.split(" . ")[0].split()[-1]
    steps = re.findall(r"\d \) (\d) (\d)", problem.prompt)
    # Rebuild the expected text by hand for this one problem.
    lines = []
    for index, (a, b) in enumerate(steps, start=1):
        after = b if ball == a else a if ball == b else ball
        lines.append(
            f" step {index} : swap cups {a} and {b} . ball was under cup {ball} ,"
            f" so it is now under cup {after} ."
        )
        ball = after
    expected = "<think>" + "".join(lines) + f" so the ball ends under cup {ball} .</think> {ball}"
    assert reference_completion(problem) == expected


def test_ids_are_stable_and_unique() -> None:
    problems = make_problems("modchain", "train", 300, 0)
    assert len({p.id for p in problems}) == 300
    assert all(p.id.startswith("modchain-") for p in problems)
    assert task_of(problems[0].prompt) == "modchain"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        make_problems("sudoku", "train", 1, 0)
    with pytest.raises(ValueError, match="no knob 'modulus'"):
        make_problems("cups", "train", 1, 0, modulus=7)
    with pytest.raises(ValueError, match="cups=1 must be an integer >= 2"):
        resolve_knobs("cups", cups=1)
    with pytest.raises(ValueError, match="split must be"):
        make_problems("cups", "test", 1, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a prompt of a built-in task"):
        task_of("what is 2 + 2?")


def test_sloppy_completion_slips_the_same_way_every_time() -> None:
    # cups: the ball under the *second* cup named stays put (2 stays under 2, then moves with "2 and 3").
    cups = Problem("c", "cups 3 , ball under 2 . swaps : 1 ) 1 2 2 ) 2 3", "1")
    text, answer = sloppy_completion(cups)
    assert answer == "3" and text.endswith("so the ball ends under cup 3 .</think> 3")
    assert "ball was under cup 2 , so it is now under cup 2 ." in text
    assert reference_completion(cups).endswith("</think> 1")
    # modchain: "minus d" is worked as "plus d", stated as confidently as the right step.
    chain = Problem("m", "start at 4 , modulo 10 . apply : 1 ) minus 3", "1")
    text, answer = sloppy_completion(chain)
    assert answer == "7" and "4 minus 3 is 7 , which modulo 10 is 7 ." in text
    # Same format as the reference: only the stated values differ.
    for problem in make_problems("cups", "eval", 20, seed=3):
        ref, slip = reference_completion(problem), sloppy_completion(problem)[0]
        assert re.sub(r"\d+", "#", ref) == re.sub(r"\d+", "#", slip)
