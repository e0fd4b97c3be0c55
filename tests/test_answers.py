"""Answer extraction and checking: exact for built-in tasks, math-verify for real math answer formats."""

from __future__ import annotations

import threading

import pytest

from raykd.problems.answers import extract_answer, is_correct, last_boxed


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think> step 1 : swap cups 1 and 2 .</think> 4", "4"),
        ("<think> a </think> 4 <|im_end|>", "4"),
        ("<think> the answer is 3 ... no </think>  7\n", "7"),
        ("<think> unfinished step 3 : swap", None),  # never closed its thinking: no answer
        ("<think></think>", ""),
        ("<think> a </think> 1 </think> 2", "2"),  # the last close wins
    ],
)
def test_extract_exact(completion: str, expected: str | None) -> None:
    assert extract_answer(completion, "exact") == expected


def test_exact_is_correct() -> None:
    assert is_correct("4", "4", "exact")
    assert is_correct(" 4 ", "4", "exact")
    assert not is_correct("4", "3", "exact")
    assert not is_correct("04", "4", "exact")
    assert not is_correct(None, "4", "exact")
    assert not is_correct("", "4", "exact")


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>2+2</think> The answer is $\\boxed{4}$.", "4"),
        ("<think>x</think> first \\boxed{1}, finally \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
        ("<think>x</think> \\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),  # nested braces
        ("<think>\\boxed{9}</think> so \\boxed{5}", "5"),  # the thinking's box is not the answer
        ("<think>x</think> 42", "42"),  # no box: the text after the thinking
        ("no thinking, just \\boxed{12}", "12"),
        ("no thinking and no box", None),
        ("<|begin_of_thought|>t<|end_of_thought|><|begin_of_solution|>so \\boxed{7}<|end_of_solution|>", "7"),
        ("<think>half-way \\boxed{3}", None),  # cut off mid-thought: no answer yet
        ("<think>x</think> \\boxed{unclosed", None),
    ],
)
def test_extract_math(completion: str, expected: str | None) -> None:
    assert extract_answer(completion, "math") == expected


@pytest.mark.parametrize(
    ("pred", "ref"),
    [
        ("\\frac{1}{2}", "0.5"),
        ("1/2", "\\frac{1}{2}"),
        ("\\dfrac{3}{4}", "0.75"),
        ("\\boxed{\\frac{3}{4}}", "3/4"),
        ("$42$", "42"),
        ("42.0", "42"),
        ("1,000", "1000"),
        ("2\\sqrt{3}", "\\sqrt{12}"),
        ("\\pi/2", "\\frac{\\pi}{2}"),
        ("10\\%", "0.1"),
        ("\\$5", "5"),
        ("x = 5", "5"),
    ],
)
def test_math_equivalent_formats(pred: str, ref: str) -> None:
    assert is_correct(pred, ref, "math")


@pytest.mark.parametrize(
    ("pred", "ref"),
    [
        ("\\frac{1}{3}", "0.33"),
        ("\\frac{2}{3}", "\\frac{3}{2}"),
        ("41", "42"),
        ("-3", "3"),
        ("\\sqrt{2}", "2"),
    ],
)
def test_math_different_values(pred: str, ref: str) -> None:
    assert not is_correct(pred, ref, "math")


def test_math_none_and_unparseable() -> None:
    assert not is_correct(None, "4", "math")
    assert not is_correct("no number here", "4", "math")


def test_math_end_to_end_from_a_completion() -> None:
    completion = (
        "<think> 3 apples then 2 more; 5/10 of the total </think> So the share is \\boxed{\\tfrac{1}{2}}."
    )
    assert is_correct(extract_answer(completion, "math"), "0.5", "math")


def test_math_works_outside_the_main_thread() -> None:
    # math-verify's own timeout uses signal.alarm, which raises off the main thread (Ray threaded actors).
    results: list[bool] = []
    worker = threading.Thread(target=lambda: results.append(is_correct("\\frac{1}{2}", "0.5", "math")))
    worker.start()
    worker.join()
    assert results == [True]


def test_last_boxed_edges() -> None:
    assert last_boxed("\\boxed{a} and \\fbox{b}") == "b"
    assert last_boxed("\\boxed {x^{2}}") == "x^{2}"
    assert last_boxed("nothing") is None


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="answer kind"):
        extract_answer("x", "fuzzy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="answer kind"):
        is_correct("x", "x", "fuzzy")  # type: ignore[arg-type]
