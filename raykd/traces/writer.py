"""The end of the trace chain: rows stream back from Ray Data; a shard is written once all its rows are in.

The filter (keep_correct / keep_all) is applied here, after the counts are taken, so the counts in every
shard's footer describe everything the teacher wrote, kept or not.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raykd.problems.answers import STATUSES
from raykd.traces.stages import SEGMENT_FIELDS
from raykd.traces.store import TraceStore, sort_topk, trace_schema, write_shard

INTERNAL_COLUMNS = ("shard", "ready_at")


@dataclass
class ShardWriter:
    """Buffers rows per shard; writes a shard as soon as its ``expected`` row count has arrived."""

    store: TraceStore
    expected: dict[int, int]
    keep_all: bool
    received: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    parts: dict[int, list[pa.Table]] = field(default_factory=lambda: defaultdict(list))
    written: list[int] = field(default_factory=list)
    generated_tokens: int = 0
    first_ready: float | None = None

    def add(self, table: pa.Table) -> None:
        if "ready_at" in table.column_names and table.num_rows:
            ready = float(pc.min(table.column("ready_at")).as_py())
            self.first_ready = ready if self.first_ready is None else min(self.first_ready, ready)
        shards = table.column("shard").to_numpy()
        for shard in np.unique(shards):
            part = table.filter(pa.array(shards == shard))
            shard = int(shard)
            self.received[shard] += part.num_rows
            self.parts[shard].append(part)
            if self.received[shard] > self.expected.get(shard, 0):
                raise RuntimeError(
                    f"shard {shard} got {self.received[shard]} rows, expected {self.expected.get(shard)}"
                )
            if self.received[shard] == self.expected[shard]:
                self._write(shard)

    def write_empty(self) -> None:
        """Shards with nothing to wait for (every trace of a text source filtered out) are written at once."""
        for shard, count in self.expected.items():
            if count == 0:
                self._write(shard)

    def missing(self) -> list[int]:
        return sorted(set(self.expected) - set(self.written))

    def _write(self, shard: int) -> None:
        schema = trace_schema(SEGMENT_FIELDS)
        parts = self.parts.pop(shard, None) or [schema.empty_table()]
        table = pa.concat_tables(parts, promote_options="permissive")
        table = table.sort_by([("problem_id", "ascending"), ("sample_index", "ascending")])
        meta = shard_counts(table)
        self.generated_tokens += meta["generated_tokens"]
        kept = table if self.keep_all else table.filter(pc.equal(table.column("status"), "correct"))
        kept = sort_topk(kept.select(schema.names).cast(schema))
        meta.update(kept_counts(kept))
        path = write_shard(self.store, shard, kept, meta)
        self.written.append(shard)
        print(
            f"[raykd] traces shard {shard + 1}/{self.store.n_shards}: {meta['generated']} generated, "
            f"{meta['kept']} kept ({', '.join(f'{meta[s]} {s}' for s in STATUSES)}) -> {path.name}",
            flush=True,
        )


def shard_counts(table: pa.Table) -> dict[str, Any]:
    """Counts over every row the teacher wrote: prompts, traces per status, generated tokens."""
    status = table.column("status").to_pylist()
    lengths = pc.list_value_length(table.column("completion_ids"))
    return {
        "prompts": len(set(table.column("problem_id").to_pylist())),
        "generated": table.num_rows,
        "generated_tokens": int(pc.sum(lengths).as_py() or 0),
        **{s: status.count(s) for s in STATUSES},
    }


def kept_counts(kept: pa.Table) -> dict[str, Any]:
    """Counts over the rows written: traces, prompt and completion tokens, summed top-k mass."""
    tail = pc.list_flatten(kept.column("tail_mass")).to_numpy(zero_copy_only=False).astype(np.float64)
    return {
        "kept": kept.num_rows,
        "prompt_tokens": int(pc.sum(pc.list_value_length(kept.column("prompt_ids"))).as_py() or 0),
        "completion_tokens": int(pc.sum(pc.list_value_length(kept.column("completion_ids"))).as_py() or 0),
        "topk_mass_sum": float(len(tail) - tail.sum()),
    }
