"""Every YAML in cluster/ is checked offline, by Ray's own code where Ray has it.

- Launcher configs (cluster/*.yaml): Ray's default filling and schema check (`prepare_config`,
  `validate_config`), as `ray up` runs them before it touches a cloud.
- KubeRay manifests (cluster/kuberay/*.yaml): kinds and the fields raykd relies on, and the RayCluster
  through Ray's own KubeRay-to-autoscaler conversion (what the autoscaler sidecar runs, schema check too).
- Both against sweeps/grid.yaml: the node types the autoscaler sees must host what the grid asks Ray for, and
  Ray's own bin-packing (`get_nodes_for`) must send engines, trial workers and trial drivers where the
  comments in the configs say.
- Shared storage: raykd reads and writes a file system, so every node mounts the same one at /mnt/raykd
  (NFS on the launcher's hosts, bound into the container; a ReadWriteMany claim in every Ray pod), and the
  grid keeps problems.path and output.dir under it.
"""

from __future__ import annotations

import copy
import re
import shlex
from functools import partial
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
from ray.autoscaler._private.resource_demand_scheduler import (
    _default_utilization_scorer,
    get_bin_pack_residual,
    get_nodes_for,
)
from ray.autoscaler._private.util import prepare_config, validate_config

from raykd.plan import TRIAL_DRIVER, Plan, make_plan
from raykd.spec import SweepSpec, load_spec

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = sorted(CLUSTER.glob("*.yaml"))
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
GRID = ROOT / "sweeps" / "grid.yaml"

# The custom resources the configs define; raykd's sweep asks for them (README.md, "Running on a cluster").
HEAD_RESOURCE = "raykd_head"  # only on the head: Tune trial drivers request 1 unit each
VLLM_RESOURCE = "raykd_vllm"  # one unit per GPU of the on-demand generation nodes
TRAIN_RESOURCE = "raykd_train"  # one unit per GPU of the spot training nodes
TRACKING_ENV = ("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
KUBERAY_KINDS = {
    ("v1", "ServiceAccount"),
    ("v1", "PersistentVolumeClaim"),
    ("ray.io/v1", "RayCluster"),
    ("ray.io/v1", "RayJob"),
}
# Where every node mounts the shared file system (raykd/spec.py's refusal of URIs points users there).
SHARED = "/mnt/raykd"

NodeTypes = dict[str, dict[str, Any]]
Demand = list[dict[str, float]]


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: not a YAML mapping"
    return data


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.fixture(scope="module")
def grid() -> tuple[SweepSpec, Plan]:
    spec = load_spec(GRID)
    return spec, make_plan(spec)


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (CLUSTER / "Dockerfile").read_text()


def kuberay_docs() -> list[dict[str, Any]]:
    return [doc for path in KUBERAY for doc in load_all(path)]


def raycluster() -> dict[str, Any]:
    (cluster,) = [d for d in kuberay_docs() if d.get("kind") == "RayCluster"]
    return cluster


def rayjob() -> dict[str, Any]:
    (job,) = [d for d in kuberay_docs() if d.get("kind") == "RayJob"]
    return job


def derived_autoscaling_config(cluster: dict[str, Any]) -> dict[str, Any]:
    """What the KubeRay autoscaler sidecar builds from the RayCluster (it runs validate_config on it)."""
    cr = copy.deepcopy(cluster)
    cr["metadata"].setdefault("namespace", "default")  # `kubectl apply` fills it in
    return _derive_autoscaling_config_from_ray_cr(cr)


# --- what the grid asks Ray for ----------------------------------------------------------------------------


def engine_demand(spec: SweepSpec, role: bool) -> Demand:
    gen = spec.generation
    bundle = {"CPU": 1.0, "GPU": float(gen.gpus_per_engine)} | (
        {VLLM_RESOURCE: float(gen.gpus_per_engine)} if role else {}
    )
    return [dict(bundle) for _ in range(gen.engines)]


def trial_worker_demand(spec: SweepSpec, plan: Plan, role: bool) -> Demand:
    res = spec.resources
    bundle = {"CPU": float(res.cpus_per_worker), "GPU": float(res.gpus_per_worker)} | (
        {TRAIN_RESOURCE: float(res.gpus_per_worker)} if role else {}
    )
    return [dict(bundle) for _ in range(res.workers_per_trial * plan.concurrent)]


def driver_demand(plan: Plan) -> Demand:
    return [{"CPU": float(TRIAL_DRIVER.cpus), HEAD_RESOURCE: 1.0} for _ in range(plan.concurrent)]


def nodes_for(types: NodeTypes, head: str, demand: Demand, max_workers: int) -> tuple[dict[str, int], Demand]:
    """Ray's autoscaler decision: which nodes it would add for `demand` on a cluster holding only the head."""
    scorer = partial(_default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary({}))
    added, residual = get_nodes_for(types, {head: 1}, head, max_workers, demand, scorer)
    return dict(added), residual


def role_type(types: NodeTypes, resource: str) -> str:
    (name,) = [n for n, t in types.items() if t["resources"].get(resource)]
    return name


# --- checks shared by the launcher configs and the RayCluster ----------------------------------------------


def check_head(types: NodeTypes, head: str, plan: Plan) -> None:
    res = types[head]["resources"]
    assert res.get("GPU", 0) == 0, "the head must have no GPU"
    assert res.get(HEAD_RESOURCE, 0) >= plan.concurrent, f"head needs {HEAD_RESOURCE} >= concurrent trials"
    assert res["CPU"] >= plan.concurrent * TRIAL_DRIVER.cpus, "head CPUs must hold every trial driver"
    others = [n for n, t in types.items() if n != head and t["resources"].get(HEAD_RESOURCE)]
    assert not others, f"{HEAD_RESOURCE} must exist only on the head, also on {others}"


def check_workers_scale_from_zero(types: NodeTypes, head: str) -> None:
    for name, node_type in types.items():
        if name != head:
            assert node_type.get("min_workers", 0) == 0, f"{name}: min_workers must be 0"
            assert node_type["resources"].get("GPU", 0) > 0, f"{name}: worker types are GPU types"


def check_fits_grid(types: NodeTypes, head: str, spec: SweepSpec, plan: Plan, max_workers: int) -> None:
    vllm, train = role_type(types, VLLM_RESOURCE), role_type(types, TRAIN_RESOURCE)
    gen, res = spec.generation, spec.resources
    vllm_gpus, train_res = types[vllm]["resources"]["GPU"], types[train]["resources"]
    assert vllm_gpus >= gen.gpus_per_engine, "an engine's GPUs must fit in one vLLM node"
    engines_per_node = vllm_gpus // gen.gpus_per_engine
    assert types[vllm]["max_workers"] * engines_per_node >= gen.engines, "too few vLLM nodes for the engines"
    assert train_res["GPU"] >= res.workers_per_trial * res.gpus_per_worker, "a trial must fit in one node"
    assert train_res["CPU"] >= res.workers_per_trial * res.cpus_per_worker, "a trial's CPUs must fit too"
    trials_per_node = train_res["GPU"] // (res.workers_per_trial * res.gpus_per_worker)
    assert types[train]["max_workers"] * trials_per_node >= plan.concurrent, "too few training nodes"
    assert max_workers >= types[vllm]["max_workers"] + types[train]["max_workers"]


def check_autoscaler_places_the_grid(
    types: NodeTypes, head: str, spec: SweepSpec, plan: Plan, max_workers: int
) -> None:
    vllm, train = role_type(types, VLLM_RESOURCE), role_type(types, TRAIN_RESOURCE)
    added, residual = nodes_for(types, head, engine_demand(spec, role=True), max_workers)
    assert residual == [] and set(added) == {vllm}, (added, residual)
    added, residual = nodes_for(types, head, trial_worker_demand(spec, plan, role=True), max_workers)
    assert residual == [] and set(added) == {train} and added[train] <= types[train]["max_workers"]
    # Until the sweep asks for the role resources, the same demand still fits (either GPU type).
    for demand in (engine_demand(spec, role=False), trial_worker_demand(spec, plan, role=False)):
        assert nodes_for(types, head, demand, max_workers)[1] == []
    # Trial drivers fit on the running head, and no node the autoscaler could add would host one.
    drivers = driver_demand(plan)
    assert get_bin_pack_residual([types[head]["resources"]], drivers)[0] == []
    assert nodes_for(types, head, drivers[:1], max_workers) == ({}, drivers[:1])


# --- the whole folder --------------------------------------------------------------------------------------


def test_every_yaml_in_cluster_is_checked() -> None:
    found = {p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml")}
    assert found == set(LAUNCHER) | set(KUBERAY), "a YAML outside cluster/*.yaml and cluster/kuberay/*.yaml"
    assert LAUNCHER and KUBERAY
    for path in LAUNCHER:
        assert "provider" in load(path), f"{path.name}: cluster/*.yaml are launcher configs"


def test_one_ray_version_everywhere(dockerfile: str) -> None:
    image = f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert re.search(rf"^FROM {re.escape(image)}$", dockerfile, re.M), "Dockerfile base image"
    for path in LAUNCHER:
        assert load(path)["docker"]["image"] == image, path.name
    assert raycluster()["spec"]["rayVersion"] == ray.__version__


# --- launcher configs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=LAUNCHER, ids=lambda p: p.name)
def launcher(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load(request.param)


def prepared(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` validates: the config merged with the provider's defaults.yaml."""
    full = prepare_config(copy.deepcopy(config))
    validate_config(full)
    return full


def test_launcher_config_passes_rays_schema(launcher: dict[str, Any]) -> None:
    full = prepared(launcher)
    assert full["head_node_type"] in full["available_node_types"]


def test_launcher_head_and_workers(launcher: dict[str, Any], grid: tuple[SweepSpec, Plan]) -> None:
    full = prepared(launcher)
    types, head = full["available_node_types"], full["head_node_type"]
    check_head(types, head, grid[1])
    check_workers_scale_from_zero(types, head)
    assert 0 < full["idle_timeout_minutes"] <= 15


def test_launcher_sized_for_the_grid(launcher: dict[str, Any], grid: tuple[SweepSpec, Plan]) -> None:
    full = prepared(launcher)
    args = (full["available_node_types"], full["head_node_type"], *grid, full["max_workers"])
    check_fits_grid(*args)
    check_autoscaler_places_the_grid(*args)


def market(node_config: dict[str, Any]) -> str:
    """'spot' or 'on-demand', for AWS and GCP node configs."""
    aws = node_config.get("InstanceMarketOptions", {}).get("MarketType")
    gcp = node_config.get("scheduling", {}).get("provisioningModel")
    return "spot" if "spot" in (aws, (gcp or "").lower()) else "on-demand"


def test_launcher_spot_only_for_training(launcher: dict[str, Any]) -> None:
    assert launcher["provider"]["type"] in ("aws", "gcp"), "market() reads AWS and GCP node configs only"
    types = launcher["available_node_types"]
    markets = {name: market(t["node_config"]) for name, t in types.items()}
    train = role_type(types, TRAIN_RESOURCE)
    assert markets == {name: "spot" if name == train else "on-demand" for name in types}
    if launcher["provider"]["type"] == "gcp":
        for name, node_type in types.items():
            if node_type["resources"].get("GPU"):
                assert node_type["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE", name


def test_launcher_keeps_auth_on_and_dashboard_local(launcher: dict[str, Any]) -> None:
    run_options = launcher["docker"]["run_options"]
    assert "--env RAY_AUTH_MODE=token" in run_options
    assert "--env {}={}".format(*TRACKING_ENV) in run_options
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token", "every node needs the token"
    (start,) = [c for c in launcher["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in start
    assert "RAY_AUTH_MODE=disabled" not in yaml.safe_dump(launcher)


def pinned(commands: list[str], package: str) -> str:
    (version,) = {m for c in commands for m in re.findall(rf'"{package}==([^"]+)"', c)}
    return version


def test_launcher_installs_torch_then_raykd_gpu(launcher: dict[str, Any], dockerfile: str) -> None:
    setup = launcher["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if '"torch==' in c)
    raykd_at = next(i for i, c in enumerate(setup) if "/home/ray/raykd[gpu]" in c)
    assert torch_at < raykd_at, "torch must be installed before raykd[gpu] pulls vLLM"
    assert launcher["file_mounts"]["/home/ray/raykd"] == ".", "the checkout the setup installs from"
    docker_runs = re.findall(r"^RUN (.*)$", dockerfile, re.M)
    for package in ("torch", "vllm"):
        assert pinned(setup, package) == pinned(docker_runs, package), f"{package} pin: Dockerfile differs"


def check_launcher_mounts_shared_storage(config: dict[str, Any]) -> None:
    """Each host mounts an NFS share at SHARED, idempotently and writable by the container's user, and Docker
    binds it into the Ray container."""
    assert f"-v {SHARED}:{SHARED}" in config["docker"]["run_options"], (
        "the container must see the host's mount"
    )
    commands = [shlex.split(c) for c in config["initialization_commands"]]
    mounts = [c for c in commands if "mount" in c and c[-1] == SHARED]
    assert len(mounts) == 1, f"one initialization command must mount the shared file system at {SHARED}"
    (mount,) = mounts
    assert mount[:4] == ["mountpoint", "-q", SHARED, "||"], "mount only if not mounted yet (idempotent)"
    assert mount[mount.index("-t") + 1] in ("nfs", "nfs4"), "EFS and Filestore are NFS"
    assert re.fullmatch(r"[\w.-]+:/\S*", mount[-2]), f"not an NFS source (server:/path): {mount[-2]}"
    at = commands.index(mount)
    assert ["sudo", "mkdir", "-p", SHARED] in commands[:at], f"{SHARED} must exist before the mount"
    # A new file system's root belongs to root; the Ray container runs as ray (uid 1000, group users).
    chown = ["sudo", "chown", "1000:100", SHARED]
    assert chown in commands[at + 1 :], f"after the mount: {shlex.join(chown)}"


def test_launcher_mounts_shared_storage(launcher: dict[str, Any]) -> None:
    check_launcher_mounts_shared_storage(launcher)
    check_launcher_mounts_shared_storage(prepared(launcher))  # Ray's defaults must not drop any of it


def without_commands(config: dict[str, Any], word: str) -> None:
    config["initialization_commands"] = [c for c in config["initialization_commands"] if word not in c]


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c["docker"]["run_options"].remove(f"-v {SHARED}:{SHARED}"),
        lambda c: without_commands(c, "sudo mount"),
        lambda c: without_commands(c, "mkdir"),
        lambda c: without_commands(c, "chown"),
        lambda c: c.update(
            initialization_commands=[x.split("|| ")[-1] for x in c["initialization_commands"]]
        ),
        lambda c: c.update(
            initialization_commands=[x.replace(SHARED, "/mnt/other") for x in c["initialization_commands"]]
        ),
    ],
    ids=["no-docker-bind", "no-mount", "no-mkdir", "no-chown", "not-idempotent", "elsewhere"],
)
@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_storage_check_catches_a_missing_mount(path: Path, breakage: Any) -> None:
    config = load(path)
    breakage(config)
    with pytest.raises(AssertionError):
        check_launcher_mounts_shared_storage(config)


@pytest.mark.parametrize(
    ("node_type", "key", "value", "error"),
    [
        ("gpu_train", "resources", {"CPU": 48, "GPU": 0.5}, jsonschema.ValidationError),  # not an integer
        ("gpu_train", "min_worker", 0, jsonschema.ValidationError),  # unknown key (typo)
        ("head", "resources", {"CPU": 16, "GPU": 1, HEAD_RESOURCE: 1000}, AssertionError),  # GPU head
        ("head", "resources", {"CPU": 16, "GPU": 0}, AssertionError),  # trial drivers cannot be placed
        ("gpu_train", "max_workers", 1, AssertionError),  # fewer nodes than concurrent trials
    ],
)
def test_launcher_checks_catch_a_broken_config(
    node_type: str, key: str, value: Any, error: type[Exception], grid: tuple[SweepSpec, Plan]
) -> None:
    config = load(CLUSTER / "aws.yaml")
    config["available_node_types"][node_type][key] = value
    with pytest.raises(error):
        full = prepared(config)
        types, head = full["available_node_types"], full["head_node_type"]
        check_head(types, head, grid[1])
        check_fits_grid(types, head, *grid, full["max_workers"])


# --- KubeRay manifests -------------------------------------------------------------------------------------


def test_kuberay_manifests_have_known_kinds() -> None:
    docs = kuberay_docs()
    assert {(d["apiVersion"], d["kind"]) for d in docs} == KUBERAY_KINDS
    assert len(docs) == len(KUBERAY_KINDS), "one of each"


def containers(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each group's Ray container (KubeRay: always the first container), keyed 'head' or groupName."""
    spec = cluster["spec"]
    groups = {"head": spec["headGroupSpec"]} | {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    return {name: group["template"]["spec"]["containers"][0] for name, group in groups.items()}


def test_raycluster_autoscales_from_zero() -> None:
    spec = raycluster()["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert 0 < spec["autoscalerOptions"]["idleTimeoutSeconds"] <= 900
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0, group["groupName"]


def test_raycluster_gpu_limits_and_images() -> None:
    ray_containers = containers(raycluster())
    assert len({c["image"] for c in ray_containers.values()}) == 1, "one image for head and workers"
    for name, container in ray_containers.items():
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        if name == "head":
            assert "nvidia.com/gpu" not in limits, "the head has no GPU"
        else:
            assert int(limits["nvidia.com/gpu"]) > 0 and limits == requests, name
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/dev/shm" in mounts, f"{name}: vLLM and NCCL need a real /dev/shm"
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get(TRACKING_ENV[0]) == TRACKING_ENV[1], name


def test_raycluster_auth_on_and_dashboard_not_exposed() -> None:
    spec = raycluster()["spec"]
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)
    accounts = {d["metadata"]["name"] for d in kuberay_docs() if d["kind"] == "ServiceAccount"}
    pods = [head, *spec["workerGroupSpecs"]]
    assert {g["template"]["spec"]["serviceAccountName"] for g in pods} <= accounts


def ray_pod_templates(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod template that runs Ray (RayClusters, RayJobs with their own cluster), by owner and group."""
    specs = {f"RayCluster {d['metadata']['name']}": d["spec"] for d in docs if d["kind"] == "RayCluster"}
    for d in docs:
        if d["kind"] == "RayJob" and "rayClusterSpec" in d["spec"]:
            specs[f"RayJob {d['metadata']['name']}"] = d["spec"]["rayClusterSpec"]
    templates = {}
    for owner, spec in specs.items():
        templates[f"{owner} head"] = spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            templates[f"{owner} {group['groupName']}"] = group["template"]
    return templates


def shared_claim(name: str, pod: dict[str, Any], container: dict[str, Any]) -> str:
    """The claim that `container` of `pod` mounts read-write at SHARED."""
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == SHARED]
    assert len(mounts) == 1, f"{name}: container {container['name']} must mount {SHARED}"
    volume = {v["name"]: v for v in pod.get("volumes", [])}.get(mounts[0]["name"], {})
    assert "persistentVolumeClaim" in volume, f"{name}: {SHARED} must come from a PersistentVolumeClaim"
    assert not mounts[0].get("readOnly") and not volume["persistentVolumeClaim"].get("readOnly"), name
    return volume["persistentVolumeClaim"]["claimName"]


def check_pods_mount_shared_storage(docs: list[dict[str, Any]]) -> None:
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    templates = ray_pod_templates(docs)
    assert templates, "no Ray pod templates"
    used = set()
    for name, template in templates.items():
        pod = template["spec"]
        claim = shared_claim(name, pod, pod["containers"][0])  # KubeRay: the Ray container is the first
        assert claim in claims, f"{name}: claim {claim} is not defined in cluster/kuberay"
        assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], f"{claim}: every node writes it"
        used.add(claim)
    assert len(used) == 1, f"every Ray pod must mount the same volume, not {sorted(used)}"
    # A new Filestore volume's root belongs to root (755) and Ray runs as uid 1000: each head, which starts
    # before its workers, makes it writable in an init container running as root.
    for name, template in templates.items():
        if name.endswith(" head"):
            pod = template["spec"]
            fixes = [
                c
                for c in pod.get("initContainers", [])
                if c.get("securityContext", {}).get("runAsUser") == 0
                and c.get("command", [""])[0] in ("chmod", "chown")
                and c["command"][-1] == SHARED
                and shared_claim(f"{name} init", pod, c) in used
            ]
            assert fixes, f"{name}: must make {SHARED} writable for uid 1000 before Ray starts"


def test_every_ray_pod_mounts_the_shared_volume() -> None:
    check_pods_mount_shared_storage(kuberay_docs())


def _pod(docs: list[dict[str, Any]], group: str) -> dict[str, Any]:
    return ray_pod_templates(docs)[f"RayCluster raykd {group}"]["spec"]


def _claim(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (claim,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    return claim


def _rayjob_with_own_cluster(docs: list[dict[str, Any]], drop_mount_in: str | None) -> None:
    """Give the RayJob a copy of the RayCluster's spec, without the shared mount in one group's Ray pod."""
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    job["spec"]["rayClusterSpec"] = spec = copy.deepcopy(cluster["spec"])
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        if group.get("groupName", "head") == drop_mount_in:
            ray_container = group["template"]["spec"]["containers"][0]
            ray_container["volumeMounts"] = [
                m for m in ray_container["volumeMounts"] if m["mountPath"] != SHARED
            ]


def _head_volume_to_emptydir(docs: list[dict[str, Any]]) -> None:
    (volume,) = _pod(docs, "head")["volumes"]
    volume.pop("persistentVolumeClaim")
    volume["emptyDir"] = {}


@pytest.mark.parametrize(
    "breakage",
    [
        lambda docs: _pod(docs, "gpu-train")["containers"][0]["volumeMounts"].pop(),
        lambda docs: _pod(docs, "gpu-vllm")["volumes"][-1]["persistentVolumeClaim"].update(claimName="other"),
        _head_volume_to_emptydir,
        lambda docs: _pod(docs, "head").pop("initContainers"),
        lambda docs: _claim(docs)["spec"].update(accessModes=["ReadWriteOnce"]),
        lambda docs: docs.remove(_claim(docs)),
        lambda docs: _rayjob_with_own_cluster(docs, drop_mount_in="gpu-vllm"),
    ],
    ids=[
        "worker-no-mount",
        "unknown-claim",
        "head-emptydir",
        "head-no-init",
        "rwo",
        "no-claim",
        "rayjob-no-mount",
    ],
)
def test_kuberay_storage_check_catches_a_missing_mount(breakage: Any) -> None:
    docs = copy.deepcopy(kuberay_docs())
    check_pods_mount_shared_storage(docs)  # the control: intact, it passes
    breakage(docs)
    with pytest.raises(AssertionError):
        check_pods_mount_shared_storage(docs)


def test_kuberay_storage_check_reads_a_rayjobs_own_cluster() -> None:
    docs = copy.deepcopy(kuberay_docs())
    _rayjob_with_own_cluster(docs, drop_mount_in=None)
    assert sum(name.startswith("RayJob ") for name in ray_pod_templates(docs)) == 3
    check_pods_mount_shared_storage(docs)


def test_raycluster_through_rays_kuberay_conversion(grid: tuple[SweepSpec, Plan]) -> None:
    config = derived_autoscaling_config(raycluster())  # raises if the autoscaler could not read it
    types, head = config["available_node_types"], config["head_node_type"]
    check_head(types, head, grid[1])
    check_workers_scale_from_zero(types, head)
    check_fits_grid(types, head, *grid, config["max_workers"])
    check_autoscaler_places_the_grid(types, head, *grid, config["max_workers"])


@pytest.mark.parametrize(
    "breakage",
    [
        lambda s: s["headGroupSpec"]["rayStartParams"].update(resources='{"raykd_head": 1000}'),  # quoting
        lambda s: s["headGroupSpec"]["rayStartParams"].pop("resources"),  # no driver resource
        lambda s: [  # a GPU group without GPUs
            r.pop("nvidia.com/gpu")
            for r in s["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"].values()
        ],
    ],
    ids=["unquoted-resources", "no-head-resource", "no-gpu-limit"],
)
def test_raycluster_checks_catch_a_broken_manifest(breakage: Any, grid: tuple[SweepSpec, Plan]) -> None:
    cluster = copy.deepcopy(raycluster())
    breakage(cluster["spec"])
    with pytest.raises((AssertionError, ValueError, KeyError)):
        config = derived_autoscaling_config(cluster)
        types, head = config["available_node_types"], config["head_node_type"]
        check_head(types, head, grid[1])
        check_workers_scale_from_zero(types, head)
        check_fits_grid(types, head, *grid, config["max_workers"])


def test_rayjob_runs_the_grid_on_the_raycluster(dockerfile: str) -> None:
    job = rayjob()["spec"]
    assert shlex.split(job["entrypoint"]) == ["python", "-m", "raykd.sweep", "sweeps/grid.yaml"]
    assert job["clusterSelector"] == {"ray.io/cluster": raycluster()["metadata"]["name"]}
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env["env_vars"][TRACKING_ENV[0]] == TRACKING_ENV[1]
    # The job's working_dir is the repository inside the image, and it holds the spec the entrypoint names.
    workdir = runtime_env["working_dir"]
    assert re.search(rf"^COPY .* sweeps {re.escape(workdir)}/sweeps$", dockerfile, re.M)
    assert re.search(rf"^COPY .* raykd {re.escape(workdir)}/raykd$", dockerfile, re.M)
    assert load_spec(GRID).name  # the entrypoint's spec exists and validates


# --- the grid on the shared mount --------------------------------------------------------------------------


def check_grid_on_shared_storage(grid_yaml: dict[str, Any]) -> None:
    for section, key in (("problems", "path"), ("output", "dir")):
        value = grid_yaml[section][key]
        assert value.startswith(f"{SHARED}/"), f"{section}.{key}: {value!r} is not on the shared {SHARED}"


def test_grid_keeps_its_files_on_the_shared_mount() -> None:
    check_grid_on_shared_storage(load(GRID))
    spec = load_spec(GRID)  # and raykd reads the same paths
    assert (spec.problems.path, spec.output.dir) == (
        load(GRID)["problems"]["path"],
        load(GRID)["output"]["dir"],
    )


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("output", "dir", "runs"), ("output", "dir", "/mnt/raykd-runs"), ("problems", "path", "/data/p.jsonl")],
)
def test_grid_storage_check_catches_a_local_path(section: str, key: str, value: str) -> None:
    grid_yaml = load(GRID)
    grid_yaml[section][key] = value
    with pytest.raises(AssertionError):
        check_grid_on_shared_storage(grid_yaml)
