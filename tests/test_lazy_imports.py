"""`import raykd` and the dry run must stay light: no torch, vllm, deepspeed, and no Ray started. So must
every module whose docstring promises it ("Light:", "Import-light", "no torch", "stays light", ...)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "vllm", "deepspeed")
# How a module's docstring says that importing it loads nothing heavy.
PROMISE = re.compile(r"import-light|\blight:|\bno torch\b|stays? light|\bno vllm\b", re.IGNORECASE)

PROBE = """
import sys
{body}
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
print("RAY_STARTED=" + str("ray" in sys.modules and sys.modules["ray"].is_initialized()))
"""


def probe(body: str) -> str:
    code = PROBE.format(body=body, heavy=HEAVY)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_raykd_is_light() -> None:
    out = probe("import raykd, raykd.spec, raykd.plan, raykd.sweep")
    assert "HEAVY=\n" in out


def test_dry_run_imports_no_heavy_module_and_starts_no_ray() -> None:
    out = probe("from raykd.sweep import main\nassert main(['sweeps/grid.yaml', '--dry-run']) == 0")
    assert "HEAVY=\n" in out
    assert "RAY_STARTED=False" in out


def promised_light() -> list[str]:
    """The raykd modules whose docstring promises a light import."""
    found = []
    for path in sorted((ROOT / "raykd").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if PROMISE.search(doc):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def test_the_promises_are_found() -> None:
    found = promised_light()
    # A few that must be among them: the scan itself must not go quiet after a docstring is reworded.
    for module in ("raykd.spec", "raykd.files", "raykd.engine.config", "raykd.traces", "raykd.kd"):
        assert module in found


@pytest.mark.parametrize("module", promised_light())
def test_a_module_that_promises_to_be_light_is(module: str) -> None:
    out = probe(f"import {module}")
    assert "HEAVY=\n" in out, f"importing {module} loads {out.split('HEAVY=')[1].splitlines()[0]}"
