"""`import raykd` and the dry run must stay light: no torch, vllm, deepspeed, and no Ray started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "vllm", "deepspeed")

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
