"""The trace store: one folder per content key, filled shard by shard, marked complete by a manifest.

Layout under ``<out_root>/traces/<key>/``::

    plan.json            what the key stands for and how problems map to shards (written once, first run)
    data/shard-00003-of-00010.parquet   one file per finished shard, written atomically (tmp + rename)
    checks/shard-00003-of-00010.json    its size, sha256 and row count, written before the rename
    damaged/             shards that failed verification, moved out of data/ (then generated again)
    tmp/                 partial writes; anything here is debris of an interrupted run and is removed
    manifest.json        the summary; present only once every shard is on disk

The key hashes what decides the traces' content (problems, teacher and tokenizer files, generation settings),
never the run, so every trial of a grid and every later sweep with the same inputs reads the same folder.
Problems are put in shards by sorted problem id, so a rerun recomputes the same shards and generates only the
ones whose file is missing. Pure Python and pyarrow: no Ray, no vLLM.

Verified on read. A shard counts as finished only when its size matches its check file; a reused folder is
verified in full (sizes, checksums, readable Parquet footers, row counts) and a damaged shard is moved to
damaged/ and generated again; a trial checks the folder before training (`verify_folder`), so a shard cut
short on disk is never fed to training.

Compact top-k storage (about 3 bytes per stored entry instead of 8; benchmarks/trace_storage.py). Each
position's top-k entries are stored sorted by token id (the loss treats them as a set), so the ids of a row
rise and their bytes compress; logprobs are float16 (rounding error at most |logprob| x 2^-11, float16's own);
both columns are written with Parquet's BYTE_STREAM_SPLIT encoding and zstd. Readers get exact ids and
float16 values, which they widen to float32.
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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raykd.files import write_json_atomic
from raykd.problems.answers import STATUSES

# Bump when the row schema or the meaning of a column changes: old folders are then simply not found.
# 3: a padded teacher no longer samples its padding rows (traces.checks.teacher_rows).
TRACE_FORMAT = 3
# Files above this size are fingerprinted by size plus their first and last chunk (hashing 16 GB of
# safetensors on every sweep start would cost minutes); everything smaller is hashed whole.
FULL_HASH_LIMIT = 64 * 2**20
EDGE_CHUNK = 8 * 2**20
SHARD_META_KEY = b"raykd.shard"
# Columns of per-entry top-k values: byte-split before zstd (floats and rising ids compress far better so).
TOPK_COLUMNS = ("topk_ids", "topk_logprobs", "prompt_topk_ids", "prompt_topk_logprobs")
ZSTD_LEVEL = 9  # shards are written once and read by every trial: a slower, tighter level pays


# --- the row schema: what every trace row holds, generated or scored -------------------------------------


def trace_schema(extra: Sequence[pa.Field] = ()) -> pa.Schema:
    """Arrow schema of one trace row; ``extra`` adds the segmentation metadata columns at the end."""
    ids, values, topk_values = pa.list_(pa.int32()), pa.list_(pa.float32()), pa.list_(pa.float16())
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
            ("topk_logprobs", topk_values),
            ("sampled_logprobs", values),
            ("tail_mass", values),
            ("prompt_topk_ids", ids),
            ("prompt_topk_logprobs", topk_values),
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

    def check_path(self, shard: int) -> Path:
        return self.root / "checks" / self.shard_path(shard).with_suffix(".json").name

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest of a complete folder whose every shard verifies; None when there is none, or when a
        shard was damaged: it is then moved to damaged/ (and the manifest removed) so the run generates it
        again."""
        if not self.manifest_path.is_file():
            return None
        manifest = json.loads(self.manifest_path.read_text())
        damaged = {s: why for s in range(self.n_shards) if (why := verify_shard(self, s, full=True))}
        if not damaged:
            return manifest
        for shard, why in damaged.items():
            print(
                f"[raykd] warning: trace shard {self.shard_path(shard).name} is damaged ({why}); "
                "moved to damaged/, it is generated again",
                flush=True,
            )
            quarantine(self, shard)
        self.manifest_path.unlink(missing_ok=True)
        return None

    def finished_shards(self) -> set[int]:
        """Shards on disk whose size matches their check (a cheap test; read_manifest does the full one)."""
        return {s for s in range(self.n_shards) if not verify_shard(self, s, full=False)}

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


def write_shard(store: TraceStore, shard: int, table: pa.Table, meta: dict[str, Any]) -> Path:
    """Write one finished shard: to ``tmp/`` first, then renamed into ``data/`` (a crash leaves no half file).

    ``meta`` (counts, tokens) rides in the Parquet footer, so the summary is rebuilt from the files alone. The
    shard's check (size, sha256, rows) is written before the rename: a shard never sits in data/ unchecked.
    """
    schema = table.schema.with_metadata({**(table.schema.metadata or {}), SHARD_META_KEY: json.dumps(meta)})
    final = store.shard_path(shard)
    tmp = store.root / "tmp" / final.name
    tmp.parent.mkdir(parents=True, exist_ok=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    present = [c for c in TOPK_COLUMNS if c in table.column_names]
    pq.write_table(
        table.replace_schema_metadata(schema.metadata),
        tmp,
        compression="zstd",
        compression_level=ZSTD_LEVEL,
        use_dictionary=[c for c in table.column_names if c not in present],
        column_encoding={f"{c}.list.element": "BYTE_STREAM_SPLIT" for c in present},
    )
    write_json_atomic(store.check_path(shard), file_check(tmp, table.num_rows))
    os.replace(tmp, final)
    return final


def sort_topk(table: pa.Table) -> pa.Table:
    """Each position's top-k entries ordered by token id (ids and logprobs together); see the module
    docstring. ``table`` rows hold (positions * k) values per list and their ``k``."""
    for ids_name, values_name in (("topk_ids", "topk_logprobs"), ("prompt_topk_ids", "prompt_topk_logprobs")):
        if ids_name not in table.column_names or table.num_rows == 0:
            continue
        ks = set(table.column("k").to_pylist())
        if len(ks) != 1 or 0 in ks:
            continue  # one k per trace set is the norm; anything else is stored as it came
        k = ks.pop()
        ids_col, values_col = (
            table.column(ids_name).combine_chunks(),
            table.column(values_name).combine_chunks(),
        )
        ids = ids_col.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
        values = values_col.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
        order = np.argsort(ids, axis=1, kind="stable")
        offsets = ids_col.offsets
        sorted_ids = pa.ListArray.from_arrays(
            offsets, pa.array(np.take_along_axis(ids, order, 1).reshape(-1))
        )
        sorted_values = pa.ListArray.from_arrays(
            offsets, pa.array(np.take_along_axis(values, order, 1).reshape(-1))
        )
        table = table.set_column(table.column_names.index(ids_name), ids_name, sorted_ids.cast(ids_col.type))
        at = table.column_names.index(values_name)
        table = table.set_column(at, values_name, sorted_values.cast(values_col.type))
    return table


# --- verification -----------------------------------------------------------------------------------------


def file_check(path: Path, rows: int) -> dict[str, Any]:
    """What a shard file must still be when read: its size, sha256 and row count."""
    return {"bytes": path.stat().st_size, "sha256": _sha256(path), "rows": rows}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path, check: dict[str, Any] | None, full: bool) -> str | None:
    """Why ``path`` does not match ``check`` (None when it does). ``full`` adds the checksum and a read of
    the Parquet footer; without it only the size is compared."""
    if not path.is_file():
        return "missing"
    if check is None:
        return "no size/checksum recorded for it"
    size = path.stat().st_size
    if size != check["bytes"]:
        return f"{size} bytes, {check['bytes']} expected"
    if not full:
        return None
    if _sha256(path) != check["sha256"]:
        return "checksum differs from the one recorded when it was written"
    try:
        rows = pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowException) as error:
        return f"not readable Parquet ({error})"
    return None if rows == check["rows"] else f"{rows} rows, {check['rows']} expected"


def verify_shard(store: TraceStore, shard: int, full: bool) -> str | None:
    check_path = store.check_path(shard)
    try:
        check = json.loads(check_path.read_text()) if check_path.is_file() else None
    except (OSError, json.JSONDecodeError):
        check = None
    return verify_file(store.shard_path(shard), check, full)


def quarantine(store: TraceStore, shard: int) -> None:
    """Move a damaged shard (and its check) out of data/, where no reader or trial would see it."""
    damaged = store.root / "damaged"
    damaged.mkdir(exist_ok=True)
    for path in (store.shard_path(shard), store.check_path(shard)):
        if path.exists():
            os.replace(path, damaged / path.name)


def verify_folder(data_dir: str | Path) -> list[str]:
    """Every problem with a finished trace folder (``<key>/data``) against its manifest: missing, cut short,
    altered or unreadable shards, and files the manifest does not list. Empty when it is whole."""
    data_dir = Path(data_dir)
    manifest_path = data_dir.parent / "manifest.json"
    try:
        shards = json.loads(manifest_path.read_text())["shards"]
    except (OSError, json.JSONDecodeError, KeyError) as error:
        return [f"{manifest_path}: no readable list of shards ({error})"]
    problems = [
        f"{name}: {why}"
        for name, check in shards.items()
        if (why := verify_file(data_dir / name, check, True))
    ]
    listed = set(shards)
    problems += [f"{p.name}: not in the manifest" for p in data_dir.iterdir() if p.name not in listed]
    return problems


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
    totals["shards"] = {
        store.shard_path(s).name: json.loads(store.check_path(s).read_text())
        for s in sorted(store.finished_shards())
    }
    totals["bytes"] = bytes_on_disk
    totals["bytes_per_token"] = bytes_on_disk / kept_tokens if kept_tokens else None
    totals["topk_mass_mean"] = mass / kept_tokens if kept_tokens else None
    return totals
