"""Autoscaling with Ray's fake multi-node provider: worker nodes are added while trials wait for them and
removed once idle.

The head (`ray start --head --autoscaling-config`, RAY_FAKE_CLUSTER=1) has CPUs for trace generation and
evaluation but no `trainer` resource; the only node type that has it starts at zero. The sweep's training
workers ask for `trainer` (`resources.worker_resources`), so its trials stay pending until the autoscaler
launches nodes for them (real Ray processes on this machine), and the nodes go after a short idle timeout.
`ray.cluster_utils.AutoscalingCluster` is not used: it runs `ray stop --force` (every Ray process on the
machine) and reads an example config the 2.60 wheel does not ship.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from ray_head import free_port, local_head, reduced_tiny, resources_arg, run_sweep

IDLE_MINUTES = 0.25


def _fake_cluster_config(gcs_port: int) -> dict:
    return {
        "cluster_name": "raykd-fake",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_MINUTES,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"127.0.0.1:{gcs_port}",
            # Nodes are processes here: no SSH updaters, node ids as addresses.
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {
                "resources": {"CPU": 2, "raykd_head": 1000},
                "node_config": {},
                "max_workers": 0,
            },
            "gpu_train": {
                "resources": {"CPU": 1, "trainer": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _events(head) -> list[str]:
    log = head.session_logs() / "monitor.log"
    return re.findall(r":event_summary:(.*)", log.read_text()) if log.exists() else []


@pytest.mark.slow
def test_autoscaler_adds_nodes_for_pending_trials_and_removes_them_when_idle(tmp_path: Path, cache_dir: Path):
    gcs_port = free_port()
    config = tmp_path / "autoscaler.json"
    config.write_text(json.dumps(_fake_cluster_config(gcs_port)))
    spec = reduced_tiny(
        tmp_path,
        "autoscale",
        truncation=[0.5, 1.0],
        segments=[["cot"]],
        max_concurrent_trials=2,
        worker_resources={"trainer": 1},
    )

    args = ["--num-cpus", "2", *resources_arg({"raykd_head": 1000}), "--autoscaling-config", str(config)]
    fake = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    with local_head(*args, env=fake, gcs_port=gcs_port) as head:
        assert not [e for e in _events(head) if e.startswith("Adding")]  # nothing asked for a node yet
        run = run_sweep(spec, cache_dir, dict(head.env, RAY_ADDRESS=head.address))
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        out = tmp_path / "runs" / "autoscale"
        records = [json.loads(p.read_text()) for p in out.glob("trials/*/result.json")]
        assert len(records) == 2 and all(r["status"] == "ok" for r in records)
        # The fake provider's node ids: both trials trained on nodes the autoscaler launched.
        assert all(r["train_node"].startswith("fffff") for r in records), records
        added = [e for e in _events(head) if e.startswith("Adding") and "gpu_train" in e]
        assert added, _events(head)
        deadline = time.time() + 120
        while time.time() < deadline and not any("(idle)" in e for e in _events(head)):
            time.sleep(2)
        removed = [e for e in _events(head) if e.startswith("Removing") and "(idle)" in e]
        assert removed, _events(head)
