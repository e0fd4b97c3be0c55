"""CI must install exactly what the README tells a newcomer: the 'Run the tests' block is in .ci/run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_block(heading: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"README section '{heading}' has no bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_test_commands_in_order() -> None:
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = readme_block("Run the tests")
    positions = [ci.index(line) for line in commands]  # ValueError names the missing line
    assert positions == sorted(positions)


def test_main_job_installs_like_the_tests_minus_dev_tools() -> None:
    main = readme_block("Set up and run the embedded default")
    tests = readme_block("Run the tests")
    assert main[-1] == "python -m raykd.sweep sweeps/tiny.yaml"
    assert main[1] == tests[0]
    assert tests[1].startswith(main[2].replace('".[cpu]"', '".[cpu,dev]"'))
    assert main[3] == tests[2]
