"""Answer extraction and checking: exact match for the built-in tasks, math-verify for math answers.

``extract_answer`` takes what a model wrote and returns the answer it committed to, or None when it never
committed to one (it never closed its thinking, or wrote no ``\\boxed{}`` for a math answer).
"""

from __future__ import annotations

import re
import threading
from typing import Literal

AnswerKind = Literal["exact", "math"]
ANSWER_KINDS = ("exact", "math")
# What a completion is, as traces and evaluation count it (`status`).
STATUSES = ("correct", "wrong", "unparseable", "truncated")

# Markers after which the answer starts: ours/Qwen3's, and the Bespoke-Stratos / OpenThoughts one.
THINK_STARTS, THINK_ENDS = ("<think>", "<|begin_of_thought|>"), ("</think>", "<|end_of_thought|>")
# Chat and trace-format markers such as <|im_end|>, <|endoftext|>, <|begin_of_solution|>.
_MARKER = re.compile(r"<\|[a-z_]+\|>")
_DOLLAR = re.compile(r"(?<!\\)\$")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_answer(completion_text: str, kind: AnswerKind) -> str | None:
    """The answer in ``completion_text``.

    exact: the text after the last ``</think>`` (markers and surrounding space removed), None without one.
    math: the content of the last ``\\boxed{...}`` after the thinking (anywhere, if the text has no think tags
    at all); failing that the text after the thinking. None when the thinking never closed (a generation cut
    off mid-thought), when a box never closes, or when nothing follows the thinking.
    """
    _check_kind(kind)
    after = _after_thinking(completion_text)
    if kind == "exact":
        return None if after is None else _clean(after)
    if after is None and any(tag in completion_text for tag in THINK_STARTS):
        return None
    region = completion_text if after is None else after
    boxed = last_boxed(region)
    if boxed is not None:
        return boxed.strip()
    if after is None or not _clean(after) or _BOXED.search(after):
        return None
    return _clean(after)


def is_correct(pred: str | None, ref: str, kind: AnswerKind) -> bool:
    """Whether the extracted answer ``pred`` matches the reference ``ref``.

    exact: equal up to surrounding and repeated whitespace. math: equivalent for math-verify (``0.5`` =
    ``\\frac{1}{2}`` = ``1/2``; ``\\boxed{}`` and ``$...$`` accepted on either side).
    """
    _check_kind(kind)
    if pred is None:
        return False
    if kind == "exact":
        return " ".join(pred.split()) == " ".join(ref.split())
    return _math_equal(pred, ref)


def status(text: str, reference: str | None, finish_reason: str, kind: str) -> tuple[str, str | None]:
    """(status, pred) of a completion: 'truncated' when it ran to max_tokens (vLLM's finish reason
    'length'), else the answer check's verdict ('unparseable' also when there is no reference)."""
    pred = extract_answer(text, kind)  # type: ignore[arg-type]
    if finish_reason == "length":
        return "truncated", pred
    if pred is None or reference is None:
        return "unparseable", None
    return ("correct" if is_correct(pred, reference, kind) else "wrong"), pred  # type: ignore[arg-type]


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, nested braces included."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for index in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            if depth == 0:
                return text[start:index]
    return None


def _after_thinking(text: str) -> str | None:
    ends = [(text.rfind(marker), marker) for marker in THINK_ENDS if marker in text]
    if not ends:
        return None
    position, marker = max(ends)
    return text[position + len(marker) :]


def _clean(text: str) -> str:
    return " ".join(_MARKER.sub(" ", text).split())


def _math_equal(pred: str, ref: str) -> bool:
    from math_verify import parse, verify

    # math-verify times out with signal.alarm, which only works in the main thread; elsewhere (Ray's threaded
    # actors, a thread pool) run without its timeout rather than fail.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(_as_latex(ref), parsing_timeout=timeout)
    guess = parse(_as_latex(pred), parsing_timeout=timeout)
    if not gold or not guess:
        return False
    return bool(verify(gold, guess, timeout_seconds=timeout))


def _as_latex(answer: str) -> str:
    # Bare LaTeX such as \dfrac{3}{4} is only recognised inside math delimiters (an escaped \$ is a dollar).
    return answer if "\\boxed" in answer or _DOLLAR.search(answer) else f"${answer}$"


def _check_kind(kind: str) -> None:
    if kind not in ANSWER_KINDS:
        raise ValueError(f"answer kind must be one of {', '.join(ANSWER_KINDS)}, got {kind!r}")
