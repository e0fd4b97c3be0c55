"""Trace storage: compact top-k columns that round-trip within float16's error into the KD worker's arrays and
the cached_topk teacher signal, and shards verified on read (a damaged shard is never fed to training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raykd.kd.divergences import forward_kl
from raykd.kd.examples import TrialData, prepare_examples
from raykd.kd.teachers import student_topk_logprobs, teacher_topk_logprobs
from raykd.traces.stages import SEGMENT_FIELDS
from raykd.traces.store import open_store, summarize, trace_schema, verify_folder, write_json_atomic
from raykd.traces.writer import ShardWriter
from raykd.trial import check_traces

VOCAB, K = 5000, 20
F16_REL = 2.0**-11  # float16 rounds to within half a unit in the last place: |x| * 2^-11 (normal range)


def teacher_rows(n_traces: int, seed: int = 0) -> tuple[pa.Table, list[tuple[np.ndarray, np.ndarray]]]:
    """Trace rows with a real-looking teacher top-k per completion token (descending logprobs, as vLLM gives
    them), plus each trace's (ids, logprobs) as (tokens, K) arrays for reference."""
    rng = np.random.default_rng(seed)
    rows, reference = [], []
    for i in range(n_traces):
        n = int(rng.integers(5, 40))
        logits = rng.standard_normal((n, VOCAB)) * 3.0
        logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        ids = np.argsort(-logprobs, axis=1)[:, :K].astype(np.int32)
        top = np.take_along_axis(logprobs, ids, 1).astype(np.float32)
        reference.append((ids, top))
        rows.append(
            {
                "problem_id": f"p{i:03d}", "sample_index": 0, "prompt": "q", "reference": "1",
                "prompt_ids": [1, 2, 3], "completion_ids": ids[:, 0].tolist(), "completion_text": "t",
                "finish_reason": "stop", "k": K, "topk_ids": ids.reshape(-1).tolist(),
                "topk_logprobs": top.reshape(-1).tolist(), "sampled_logprobs": top[:, 0].tolist(),
                "tail_mass": (1 - np.exp(top).sum(1)).tolist(), "prompt_topk_ids": [],
                "prompt_topk_logprobs": [], "prompt_tail_mass": [], "status": "correct", "pred": "1",
                "segments": [0, 0, 0] + [1] * (n - 1) + [2], "close_start": -1, "answer_start": 2 + n,
                "seg_flags": 4, "shard": 0, "ready_at": 1.0,
            }
        )  # fmt: skip
    schema = trace_schema(SEGMENT_FIELDS).append(pa.field("shard", pa.int64()))
    schema = schema.append(pa.field("ready_at", pa.float64()))
    # The chain hands float32 values to the writer, as vLLM's stage does.
    schema = schema.set(
        schema.get_field_index("topk_logprobs"), pa.field("topk_logprobs", pa.list_(pa.float32()))
    )
    return pa.Table.from_pylist(rows, schema=schema), reference


def write_one_shard(root: Path, n_traces: int = 12) -> tuple[object, list[tuple[np.ndarray, np.ndarray]]]:
    table, reference = teacher_rows(n_traces)
    store = open_store(root, {}, table.column("problem_id").to_pylist(), shard_size=n_traces)
    ShardWriter(store, {0: n_traces}, keep_all=False).add(table)
    write_json_atomic(store.manifest_path, summarize(store))
    return store, reference


def test_stored_topk_round_trips_within_float16_error_into_the_kd_signal(tmp_path: Path) -> None:
    store, reference = write_one_shard(tmp_path / "k")
    table = pq.read_table(store.data_dir)
    assert table.schema.field("topk_logprobs").type == pa.list_(pa.float16())
    examples, _ = prepare_examples(table.to_pydict(), TrialData())
    assert len(examples) == len(reference)
    for example, (ids, top) in zip(examples, reference, strict=True):
        order = np.argsort(ids, axis=1, kind="stable")
        want_ids, want = np.take_along_axis(ids, order, 1), np.take_along_axis(top, order, 1)
        got_ids = example.topk_ids[example.has_teacher]
        got = example.topk_logprobs[example.has_teacher]
        np.testing.assert_array_equal(got_ids, want_ids)  # ids exact, each row sorted by id
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))  # float16's rounding
        assert np.all(np.abs(got - want) <= np.abs(want) * F16_REL)
        # The cached_topk teacher signal the loss builds: the same within float16's error.
        stored, _ = teacher_topk_logprobs(torch.from_numpy(got), VOCAB)
        exact, _ = teacher_topk_logprobs(torch.from_numpy(want), VOCAB)
        torch.testing.assert_close(stored.exp(), exact.exp(), rtol=0, atol=1e-3)
        student = student_topk_logprobs(
            torch.randn(len(got), VOCAB, dtype=torch.float64), torch.from_numpy(got_ids)
        )
        kl_stored, kl_exact = forward_kl(student, stored), forward_kl(student, exact)
        torch.testing.assert_close(kl_stored, kl_exact, rtol=2e-3, atol=1e-4)


def test_a_truncated_shard_is_detected_moved_aside_and_never_trained_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, _ = write_one_shard(tmp_path / "k")
    manifest = store.read_manifest()
    assert manifest is not None and verify_folder(store.data_dir) == []
    check_traces(str(store.data_dir))  # a whole folder passes
    shard = store.shard_path(0)
    entry = manifest["shards"][shard.name]
    assert entry["bytes"] == shard.stat().st_size and len(entry["sha256"]) == 64
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)  # a full disk, a killed copy
    problems = verify_folder(store.data_dir)
    assert problems == [f"{shard.name}: {shard.stat().st_size} bytes, {entry['bytes']} expected"]
    with pytest.raises(RuntimeError, match=r"damaged .*run the same sweep command again"):
        check_traces(str(store.data_dir))
    assert store.finished_shards() == set()  # a resumed generation would write it again
    assert store.read_manifest() is None  # so the sweep generates it again
    assert "is damaged" in capsys.readouterr().out
    assert not shard.exists() and (store.root / "damaged" / shard.name).is_file()
    assert not store.manifest_path.exists() and store.missing_shards() == [0]


def test_same_size_corruption_and_foreign_files_are_caught(tmp_path: Path) -> None:
    store, _ = write_one_shard(tmp_path / "k")
    shard = store.shard_path(0)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (store.data_dir / "stray.parquet").write_bytes(b"x")
    problems = verify_folder(store.data_dir)
    assert problems == [
        f"{shard.name}: checksum differs from the one recorded when it was written",
        "stray.parquet: not in the manifest",
    ]
    json.loads(store.manifest_path.read_text())  # the manifest itself is untouched by a check
