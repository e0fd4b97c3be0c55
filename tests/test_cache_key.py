"""The embedded models' cache key hashes code, not documentation: a docstring or comment edit in one of the
sources keeps the built models; a change to what they compute rebuilds them."""

from __future__ import annotations

from pathlib import Path

import raykd.problems.tasks
from raykd.embedded.bootstrap import _code_only

TASKS = Path(raykd.problems.tasks.__file__)


def test_docstring_and_comment_edits_keep_the_key() -> None:
    source = TASKS.read_text()
    first_line = source.splitlines()[0]  # the module docstring's first line
    edited = source.replace(first_line, first_line + " (edited)", 1).replace(
        "\nfrom ", "\n# a note\nfrom ", 1
    )
    assert edited != source
    assert _code_only(edited) == _code_only(source)


def test_function_docstrings_are_dropped_at_any_depth() -> None:
    documented = 'class A:\n    """a"""\n    def f(self):\n        """f"""\n        return 1  # why\n'
    bare = "class A:\n    def f(self):\n        return 1\n"
    assert _code_only(documented) == _code_only(bare)


def test_a_code_edit_changes_the_key() -> None:
    source = TASKS.read_text()
    edited = source.replace("def ", "def _renamed_", 1)
    assert _code_only(edited) != _code_only(source)
    # A string that is code (a value, not a docstring) still counts.
    assert _code_only('x = "a"\n') != _code_only('x = "b"\n')
