"""Built-in synthetic reasoning tasks with exact answers, where the chain of thought matters.

Two tasks, each deterministic from a seed and with difficulty knobs:

- ``cups``: ``cups`` cups, a ball under one, ``steps`` swaps; the answer is the cup hiding the ball at the
  end.
- ``modchain``: a value taken through ``steps`` operations (plus d, minus d, times u with u a unit) modulo
  ``modulus``; the answer is the final value.

A small decoder solves both with the chain of thought and sits at chance without it (measured on a decoder of
~1M parameters, 4 layers, short chains: cups 100% with the chain, 21% without, chance 20%; modchain 95% /
10%). The chain is verbose on purpose: each step restates what it does ("step 3 : swap cups 4 and 1 . ball was
under cup 1 , so it is now under cup 4 ."), so the chain of thought holds most of a trace's tokens, as in real
reasoning traces, and a lead span of 0.5 cuts into the reasoning rather than into the prompt.

Train and eval splits never share a problem: a problem's split is a function of its content (a hash of its
prompt), not of the seed, so no seed and no ``n`` can put one problem in both.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "eval"]
TASKS = ("cups", "modchain")

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# One problem in EVAL_BUCKETS belongs to the eval split; the rest to train.
EVAL_BUCKETS = 8
# Give up when this many draws in a row bring no new problem (the problem space is exhausted).
MAX_STALE_DRAWS = 10_000

DEFAULT_KNOBS: dict[str, dict[str, int]] = {
    "cups": {"cups": 5, "steps": 8},
    "modchain": {"modulus": 10, "steps": 8},
}


@dataclass(frozen=True)
class Problem:
    """A prompt with its reference answer; ``id`` is stable across runs (derived from the content)."""

    id: str
    prompt: str
    answer: str


def resolve_knobs(task: str, **knobs: int) -> dict[str, int]:
    """The task's default knobs overridden by ``knobs``; unknown tasks, unknown knobs or bad values raise."""
    if task not in DEFAULT_KNOBS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    defaults = DEFAULT_KNOBS[task]
    unknown = sorted(set(knobs) - set(defaults))
    if unknown:
        raise ValueError(f"task {task!r} has no knob {unknown[0]!r}; its knobs are {', '.join(defaults)}")
    resolved = {**defaults, **knobs}
    minimum = {"cups": 2, "steps": 1, "modulus": 2}
    for name, value in resolved.items():
        if not isinstance(value, int) or value < minimum[name]:
            raise ValueError(f"task {task!r}: knob {name}={value!r} must be an integer >= {minimum[name]}")
    return resolved


def make_problems(task: str, split: Split, n: int, seed: int, **knobs: int) -> list[Problem]:
    """``n`` distinct problems of ``task`` from ``split``, the same for the same (seed, knobs).

    A problem is drawn, then kept only if its content hashes to ``split``; so train and eval are disjoint for
    every seed. Raises ValueError if the split holds fewer than ``n`` distinct problems.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    resolved = resolve_knobs(task, **knobs)
    draw = _DRAWERS[task]
    rng = random.Random(f"raykd/{task}/{split}/{seed}")
    problems: dict[str, Problem] = {}
    stale = 0
    while len(problems) < n:
        prompt, answer = draw(rng, **resolved)
        if split_of(prompt) != split or prompt in problems:
            stale += 1
            if stale > MAX_STALE_DRAWS:
                raise ValueError(
                    f"task {task!r} with knobs {resolved} has fewer than {n} distinct {split} problems "
                    f"(found {len(problems)}); ask for fewer or raise the difficulty knobs"
                )
            continue
        stale = 0
        problems[prompt] = Problem(id=f"{task}-{_digest(prompt)[:16]}", prompt=prompt, answer=answer)
    return list(problems.values())


def space_size(task: str, **knobs: int) -> int:
    """How many distinct problems ``task`` has with these knobs (both splits together)."""
    k = resolve_knobs(task, **knobs)
    if task == "cups":
        return k["cups"] * (k["cups"] * (k["cups"] - 1)) ** k["steps"]
    units = sum(math.gcd(u, k["modulus"]) == 1 for u in range(1, k["modulus"]))
    return k["modulus"] * (2 * (k["modulus"] - 1) + units) ** k["steps"]


def split_of(prompt: str) -> Split:
    """The split a prompt belongs to, from its content alone."""
    return "eval" if int(_digest(prompt)[:8], 16) % EVAL_BUCKETS == 0 else "train"


def reference_completion(problem: Problem) -> str:
    """The assistant text for ``problem``: ``"<think> ...steps... </think> answer"``, no end-of-turn token."""
    chain, _ = _CHAINS[task_of(problem.prompt)](problem.prompt)
    return f"{THINK_OPEN}{chain}{THINK_CLOSE} {problem.answer}"


def sloppy_completion(problem: Problem) -> tuple[str, str]:
    """A worked solution in the reference format that reasons with one systematic slip, and its answer.

    cups: the ball only moves when it sits under the *first* cup named (a swap "a and b" with the ball under
    b leaves it there). modchain: "minus d" is worked as "plus d". Every step is stated as confidently as in
    the reference chain and the answer follows the chain, so only the reasoning is wrong. The embedded
    student base is pretrained mostly on these (raykd.embedded.bootstrap). Returns (completion, answer).
    """
    chain, answer = _CHAINS[task_of(problem.prompt)](problem.prompt, sloppy=True)
    return f"{THINK_OPEN}{chain}{THINK_CLOSE} {answer}", answer


def task_of(prompt: str) -> str:
    """The built-in task a prompt was written by; ValueError for any other text."""
    if prompt.startswith("cups ") and " . swaps : " in prompt:
        return "cups"
    if prompt.startswith("start at ") and " . apply : " in prompt:
        return "modchain"
    raise ValueError(f"not a prompt of a built-in task: {prompt[:60]!r}")


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


# --- cups --------------------------------------------------------------------------------------------------


def _draw_cups(rng: random.Random, cups: int, steps: int) -> tuple[str, str]:
    ball = rng.randint(1, cups)
    swaps = [tuple(rng.sample(range(1, cups + 1), 2)) for _ in range(steps)]
    listed = " ".join(f"{step} ) {a} {b}" for step, (a, b) in enumerate(swaps, start=1))
    prompt = f"cups {cups} , ball under {ball} . swaps : {listed}"
    for a, b in swaps:
        ball = b if ball == a else a if ball == b else ball
    return prompt, str(ball)


def _parse_cups(prompt: str) -> tuple[int, list[tuple[int, int]]]:
    head, listed = prompt.split(" . swaps : ")
    ball = int(head.split()[-1])
    numbers = [int(word) for word in listed.split() if word != ")"]
    swaps = [(numbers[i + 1], numbers[i + 2]) for i in range(0, len(numbers), 3)]
    return ball, swaps


def _chain_cups(prompt: str, sloppy: bool = False) -> tuple[str, str]:
    ball, swaps = _parse_cups(prompt)
    lines = []
    for step, (a, b) in enumerate(swaps, start=1):
        after = b if ball == a else a if ball == b and not sloppy else ball
        lines.append(
            f" step {step} : swap cups {a} and {b} . ball was under cup {ball} ,"
            f" so it is now under cup {after} ."
        )
        ball = after
    return "".join(lines) + f" so the ball ends under cup {ball} .", str(ball)


# --- modchain ----------------------------------------------------------------------------------------------

_OPS = ("plus", "minus", "times")


def _draw_modchain(rng: random.Random, modulus: int, steps: int) -> tuple[str, str]:
    units = [u for u in range(1, modulus) if math.gcd(u, modulus) == 1]
    value = rng.randrange(modulus)
    ops = []
    for _ in range(steps):
        op = rng.choice(_OPS)
        # Multiplying by a unit keeps every earlier operation visible in the answer (x0 or x5 mod 10 won't).
        operand = rng.choice(units) if op == "times" else rng.randint(1, modulus - 1)
        ops.append((op, operand))
    listed = " ".join(f"{step} ) {op} {operand}" for step, (op, operand) in enumerate(ops, start=1))
    prompt = f"start at {value} , modulo {modulus} . apply : {listed}"
    for op, operand in ops:
        value = _apply(value, op, operand) % modulus
    return prompt, str(value)


def _apply(value: int, op: str, operand: int) -> int:
    return value + operand if op == "plus" else value - operand if op == "minus" else value * operand


def _chain_modchain(prompt: str, sloppy: bool = False) -> tuple[str, str]:
    head, listed = prompt.split(" . apply : ")
    value, modulus = int(head.split()[2]), int(head.split()[-1])
    lines = []
    # listed: "1 ) plus 3 2 ) times 7 ..."
    words = listed.split()
    for step, index in enumerate(range(0, len(words), 4), start=1):
        op, operand = words[index + 2], words[index + 3]
        raw = _apply(value, "plus" if sloppy and op == "minus" else op, int(operand))
        # The operation is copied first, right after the step label, as cups copies its swap: copied later
        # (after "the value is v , and v"), a 4-layer teacher misread operands of late steps (92.6% greedy).
        lines.append(
            f" step {step} : {op} {operand} . the value is {value} , and {value} {op} {operand} is {raw} ,"
            f" which modulo {modulus} is {raw % modulus} ."
        )
        value = raw % modulus
    return "".join(lines) + f" so the final value is {value} .", str(value)


_DRAWERS = {"cups": _draw_cups, "modchain": _draw_modchain}
_CHAINS = {"cups": _chain_cups, "modchain": _chain_modchain}
