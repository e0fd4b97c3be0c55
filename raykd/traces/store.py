"""The trace store: one folder per content key, filled shard by shard, marked complete by a manifest.

Layout under ``<out_root>/traces/<key>/``::

    plan.json            what the key stands for and how problems map to shards (written once, first run)
    data/shard-00003-of-00010.parquet   one file per finished shard, written atomically (tmp + rename)
    tmp/                 partial writes; anything here is debris of an interrupted run and is removed
    manifest.json        the summary; present only once every shard is on disk

The key hashes what decides the traces' content (problems, teacher and tokenizer files, generation settings),
never the run, so every trial of a grid and every later sweep with the same inputs reads the same folder.
Problems are put in shards by sorted problem id, so a rerun recomputes the same shards and generates only the
ones whose file is missing. Pure Python and pyarrow: no Ray, no vLLM.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

# Bump when the row schema or the meaning of a column changes: old folders are then simply not found.
TRACE_FORMAT = 1
# Files above this size are fingerprinted by size plus their first and last chunk (hashing 16 GB of
# safetensors on every sweep start would cost minutes); everything smaller is hashed whole.
FULL_HASH_LIMIT = 64 * 2**20
EDGE_CHUNK = 8 * 2**20
SHARD_META_KEY = b"raykd.shard"
STATUSES = ("correct", "wrong", "unparseable", "truncated")


# --- the row schema (CONTRACT.md "Trace rows") -----------------------------------------------------------


def trace_schema(extra: Sequence[pa.Field] = ()) -> pa.Schema:
    """Arrow schema of one trace row; ``extra`` adds the segmentation metadata columns at the end."""
    ids, values = pa.list_(pa.int32()), pa.list_(pa.float32())
    return pa.schema(
        [
            ("problem_id", pa.string()),
            ("sample_index", pa.int32()),
            ("prompt", pa.string()),
            ("reference", pa.string()),
            ("prompt_ids", ids),
            ("completion_ids", ids),
            ("completion_text", pa.string()),
            ("finish_reason", pa.string()),
            ("k", pa.int32()),
            ("topk_ids", ids),
            ("topk_logprobs", values),
            ("sampled_logprobs", values),
            ("tail_mass", values),
            ("prompt_topk_ids", ids),
            ("prompt_topk_logprobs", values),
            ("prompt_tail_mass", values),
            ("status", pa.string()),
            ("pred", pa.string()),
            ("segments", pa.list_(pa.int8())),
            *extra,
        ]
    )


# --- content keys -----------------------------------------------------------------------------------------


def fingerprint_path(path: str | Path) -> str:
    """A content hash of a file or folder (relative names, sizes and bytes; see FULL_HASH_LIMIT)."""
    root = Path(path)
    digest = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        rel = file.name if file == root else file.relative_to(root).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts):
            continue  # .cache/, .gitattributes and editor files do not change the model
        size = file.stat().st_size
        digest.update(f"{rel}\0{size}\0".encode())
        with file.open("rb") as handle:
            if size <= FULL_HASH_LIMIT:
                digest.update(handle.read())
            else:
                digest.update(handle.read(EDGE_CHUNK))
                handle.seek(size - EDGE_CHUNK)
                digest.update(handle.read(EDGE_CHUNK))
    return digest.hexdigest()


def problems_digest(problems: Iterable[Any]) -> str:
    """Order-free hash of (id, prompt, answer) of every problem."""
    rows = sorted(f"{p.id}\0{p.prompt}\0{p.answer}" for p in problems)
    return hashlib.sha256("\1".join(rows).encode()).hexdigest()


def content_key(material: dict[str, Any]) -> str:
    """The folder name for ``material`` (a JSON-able dict of everything that decides the traces)."""
    blob = json.dumps({"format": TRACE_FORMAT, **material}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


# --- the folder -------------------------------------------------------------------------------------------


@dataclass
class TraceStore:
    """One content-keyed trace folder."""

    root: Path
    n_shards: int = 0
    shard_problems: list[list[str]] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def shard_path(self, shard: int) -> Path:
        return self.data_dir / f"shard-{shard:05d}-of-{self.n_shards:05d}.parquet"

    def read_manifest(self) -> dict[str, Any] | None:
        return json.loads(self.manifest_path.read_text()) if self.manifest_path.is_file() else None

    def finished_shards(self) -> set[int]:
        return {s for s in range(self.n_shards) if self.shard_path(s).is_file()}

    def missing_shards(self) -> list[int]:
        done = self.finished_shards()
        return [s for s in range(self.n_shards) if s not in done]


def open_store(
    root: Path, material: dict[str, Any], problem_ids: Sequence[str], shard_size: int
) -> TraceStore:
    """Open (or start) the folder: the first run fixes the shard layout in plan.json; reruns reuse it.

    Debris of an interrupted write (``tmp/``) is removed; finished shards are kept.
    """
    ids = sorted(problem_ids)
    if len(set(ids)) != len(ids):
        dup = next(a for a, b in itertools.pairwise(ids) if a == b)
        raise ValueError(f"problem id {dup!r} appears twice; every problem needs a distinct id")
    plan_path = root / "plan.json"
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        shard_size = plan["shard_size"]  # a rerun must cut the same shards whatever it was told
    else:
        plan = {"key_material": material, "shard_size": shard_size, "n_problems": len(ids)}
        write_json_atomic(plan_path, plan)
    shutil.rmtree(root / "tmp", ignore_errors=True)
    shards = [ids[i : i + shard_size] for i in range(0, len(ids), shard_size)]
    return TraceStore(root=root, n_shards=len(shards), shard_problems=shards)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def write_shard(store: TraceStore, shard: int, table: pa.Table, meta: dict[str, Any]) -> Path:
    """Write one finished shard: to ``tmp/`` first, then renamed into ``data/`` (a crash leaves no half file).

    ``meta`` (counts, tokens) rides in the Parquet footer, so the summary is rebuilt from the files alone.
    """
    schema = table.schema.with_metadata({**(table.schema.metadata or {}), SHARD_META_KEY: json.dumps(meta)})
    final = store.shard_path(shard)
    tmp = store.root / "tmp" / final.name
    tmp.parent.mkdir(parents=True, exist_ok=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata(schema.metadata), tmp, compression="zstd")
    os.replace(tmp, final)
    return final


def shard_meta(path: Path) -> dict[str, Any]:
    """The counts stored in a shard's footer (read without loading the rows)."""
    return json.loads(pq.read_schema(path).metadata[SHARD_META_KEY])


def summarize(store: TraceStore) -> dict[str, Any]:
    """Totals over every finished shard: prompts, traces generated and kept, status counts, tokens, bytes."""
    names = ("prompts", "generated", "generated_tokens", "kept", "prompt_tokens", "completion_tokens")
    totals: dict[str, Any] = dict.fromkeys(names, 0)
    totals.update(dict.fromkeys(STATUSES, 0))
    mass, bytes_on_disk = 0.0, 0
    for shard in sorted(store.finished_shards()):
        path = store.shard_path(shard)
        meta = shard_meta(path)
        for name in totals:
            totals[name] += meta[name]
        mass += meta["topk_mass_sum"]
        bytes_on_disk += path.stat().st_size
    kept_tokens = totals["completion_tokens"]
    totals["bytes"] = bytes_on_disk
    totals["bytes_per_token"] = bytes_on_disk / kept_tokens if kept_tokens else None
    totals["topk_mass_mean"] = mass / kept_tokens if kept_tokens else None
    return totals
