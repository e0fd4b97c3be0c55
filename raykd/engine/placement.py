"""The Ray resources of one engine actor in a Ray Data pool. Light: Ray is imported when a group is made."""

from __future__ import annotations

from typing import Any


def engine_remote_args(
    gpus: int, tensor_parallel: int, resources: dict[str, float] | None = None
) -> dict[str, Any]:
    """Ray resources of one engine actor (``resources``: custom ones it also asks for); with several GPUs
    vLLM's Ray executor places its own workers in a placement group the actor captures (as ray.data.llm
    does), the custom resources in its first bundle."""
    custom = {"resources": dict(resources)} if resources else {}
    if gpus <= 1:
        return {"num_cpus": 1, "num_gpus": gpus, **custom}
    return {"num_gpus": 0, "ray_remote_args_fn": PlacementGroupArgs(gpus, resources or {})}


class PlacementGroupArgs:
    """Picklable ray_remote_args_fn: a fresh PACK placement group of ``gpus`` GPU bundles per engine actor;
    ``resources`` (custom) join the first bundle, so the group lands on a node that has them."""

    def __init__(self, gpus: int, resources: dict[str, float]):
        self.gpus = gpus
        self.resources = resources

    def __call__(self) -> dict[str, Any]:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundles = [{"GPU": 1, "CPU": 1} for _ in range(self.gpus)]
        bundles[0] |= self.resources
        group = ray.util.placement_group(bundles, strategy="PACK")
        return {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                group, placement_group_capture_child_tasks=True
            )
        }
