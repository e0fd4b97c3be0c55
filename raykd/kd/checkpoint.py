"""A training worker's checkpoints: where it is in the data, its running sums, reported to Ray Train.

Every `checkpoint_every` steps each worker writes its part of a DeepSpeed checkpoint
(`engine.save_checkpoint`: model and, per rank, ZeRO optimizer partitions) to a local folder and reports
it; Ray Train merges the workers' folders into one checkpoint. Rank 0 adds `state.json` (the `Position`),
every rank `rank<r>.json` (its running sums and a digest of its shard). On a restart,
`ray.train.get_checkpoint()` gives the latest one back and `restore` reloads the engine and says where to
go on.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from raykd.kd.metrics import Totals

STATE_FILE = "state.json"


@dataclass(frozen=True)
class Position:
    """Where a run stands: steps taken, and the epoch and step within it that come next."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    done: bool = False  # the student is exported: a restart only reports the final metrics again


@dataclass(frozen=True)
class RankState:
    """What one rank writes besides DeepSpeed's files."""

    rank: int
    digest: str  # raykd.kd.examples.shard_digest of its shard
    examples: int
    totals: Totals


def write_state(folder: str, state: RankState, position: Position, tag: str | None) -> None:
    """Each rank's own running sums and shard digest; rank 0 adds the shared position in the data."""
    own = {"digest": state.digest, "examples": state.examples, "totals": asdict(state.totals)}
    (Path(folder) / f"rank{state.rank}.json").write_text(json.dumps(own))
    if state.rank == 0:
        (Path(folder) / STATE_FILE).write_text(json.dumps({"tag": tag, **asdict(position)}))


def report(metrics: dict[str, Any], engine: Any, state: RankState, position: Position, tag: str) -> None:
    """Report `metrics` with a checkpoint of the engine (tag: DeepSpeed's name for it) and the state."""
    with tempfile.TemporaryDirectory(prefix="raykd-ckpt-") as folder:
        engine.save_checkpoint(folder, tag=tag)
        write_state(folder, state, position, tag)
        _report(metrics, folder, f"checkpoint_{position.global_step:07d}")


def report_final(metrics: dict[str, Any], state: RankState, position: Position) -> None:
    """The final report, with a small checkpoint (state only: the exported student holds the weights)."""
    with tempfile.TemporaryDirectory(prefix="raykd-final-") as folder:
        write_state(folder, state, position, None)
        _report(metrics, folder, "checkpoint_final")


def _report(metrics: dict[str, Any], folder: str, name: str) -> None:
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(folder)
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def restore(checkpoint: Any, engine: Any, rank: int, digest: str) -> tuple[Position, Totals]:
    """Reload the engine from a Ray Train checkpoint; this rank's running sums and where to go on."""
    with checkpoint.as_directory() as folder:
        state = json.loads((Path(folder) / STATE_FILE).read_text())
        tag = state.pop("tag", None)
        if tag:
            engine.load_checkpoint(folder, tag=tag)
        own = json.loads((Path(folder) / f"rank{rank}.json").read_text())
    if own["digest"] != digest:
        print(
            f"[raykd rank {rank}] warning: this worker's shard differs from the checkpointed run's; the "
            "resumed epoch may repeat or skip some traces",
            flush=True,
        )
    return Position(**state), Totals(**own["totals"])
