"""A sweep on a 3-node Ray cluster on one machine (`ray.cluster_utils.Cluster`).

A custom resource, `trainer`, stands in for the GPUs of a real cluster's worker nodes: the head has none, each
of the two worker nodes has one, and the spec's `resources.worker_resources` makes every training worker ask
for it. So the two concurrent trials must train on different worker nodes, reading the traces the driver
wrote on the head node (on a real cluster the output folder is a shared mount; here all nodes share a disk).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ray_head import reduced_tiny, run_sweep


@pytest.mark.slow
def test_trials_train_on_different_nodes_from_traces_written_on_the_head(tmp_path: Path, cache_dir: Path):
    from ray.cluster_utils import Cluster

    spec = reduced_tiny(
        tmp_path,
        "multinode",
        truncation=[0.5, 1.0],
        segments=[["cot"]],
        max_concurrent_trials=2,
        worker_resources={"trainer": 1},
    )
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"raykd_head": 1000}})
    try:
        workers = [cluster.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(2)]
        cluster.wait_for_nodes()
        run = run_sweep(spec, cache_dir, {"RAY_ADDRESS": cluster.address})
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        assert "Started a local Ray instance" not in run.stdout + run.stderr  # it joined the cluster
        out = tmp_path / "runs" / "multinode"
        records = [json.loads(p.read_text()) for p in sorted(out.glob("trials/*/result.json"))]
        assert [r["trial_id"] for r in records] == ["f0.50_CoT_s0", "f1.00_CoT_s0"]
        assert all(r["status"] == "ok" and 0 <= r["accuracy"] <= 1 for r in records)
        train_nodes = {r["train_node"] for r in records}
        worker_ids = {w.node_id for w in workers}
        # Each trial on its own worker node; none on the head, where the driver wrote the traces.
        assert train_nodes == worker_ids and cluster.head_node.node_id not in train_nodes
        assert any((tmp_path / "runs" / "traces").rglob("*.parquet"))
    finally:
        cluster.shutdown()
