"""A padded teacher kept off its padding rows at generation: what it costs and what it changes.

When the teacher's embedding has rows its tokenizer does not hold (Qwen3-8B: 151,936 rows, 151,669
tokens), raykd's trace generation masks them out of sampling (`raykd.traces.pipeline.sampling_params`: a
bias of -inf on each padding row, vLLM's `logit_bias`, or the tokens as `allowed_token_ids` when those are
fewer). This measures it side by side in one engine per process layout, on a random 2-layer Llama with
Qwen3-8B's row and token counts whose 267 padding rows are copies of real rows x 30 (so they dominate its
logits, as an untrained padding row may), against no restriction and against the other option vLLM
offers (all 151,669 token ids as allowed_token_ids, which vLLM copies per request and its V2 model runner,
the GPU default, refuses above 1024 ids):

    cost     generate() wall time per setting, same prompts and seeds, settings alternating within each
             round, best of the rounds; for vLLM's default layout (EngineCore in its own process, as on
             GPU: each request's list crosses a process boundary) and raykd's CPU single-process engine;
             overhead per request = (restricted - unrestricted) / requests.
    effect   the share of sampled tokens that are padding ids; whether the top-k logprobs vLLM returns are
             the same as unrestricted (raw_logprobs are taken before any logits processor), compared at
             every position up to the first one that sampled differently, where both runs saw the same
             tokens; how many padding ids those top-k rows hold.

    flock /tmp/raykd-locks/heavy python benchmarks/padding_rows.py --out benchmarks/results/padding_rows.json

`--rows/--tokens/--prompts/--max-tokens/--rounds` change the sizes. No test runs it (two vLLM engines,
minutes); the behaviour is tested through the stack by tests/test_padded_pair_sweep.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def build_model(folder: Path, rows: int, tokens: int) -> Path:
    """A random Llama with ``rows`` rows whose rows >= ``tokens`` (padding) copy real rows x 30, and the
    embedded task tokenizer (the engine needs one; prompts are given as ids, nothing is decoded)."""
    import torch

    from raykd.embedded.tokenizer import build_tokenizer
    from raykd.kd import synthetic

    build_tokenizer(folder)
    model = synthetic.tiny_llama(rows, hidden=64, heads=2, layers=2, max_positions=512)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[tokens:] = 30.0 * head[: rows - tokens]
    model.save_pretrained(folder)
    return folder


def engine(folder: Path, single: bool, k: int) -> Any:
    from raykd.engine.config import EngineConfig
    from raykd.engine.vllm_engine import VllmEngine

    return VllmEngine(
        EngineConfig(
            model=str(folder), tokenizer=str(folder), max_model_len=256, max_logprobs=k, single_process=single
        )
    )


def run(llm: Any, prompts: list[list[int]], sampling: dict[str, Any]) -> tuple[float, list[dict]]:
    seeds = list(range(len(prompts)))
    start = time.perf_counter()
    out = llm.generate(prompts, seeds, sampling)
    return time.perf_counter() - start, out


def compare(plain: list[dict], masked: list[dict], k: int, tokens: int) -> dict[str, Any]:
    """Padding share sampled, and the top-k agreement up to each request's first differing sample."""
    import numpy as np

    compared, max_diff, same_ids, padding_in_topk = 0, 0.0, True, 0
    for a, b in zip(plain, masked, strict=True):
        ca, cb = a["completion_ids"], b["completion_ids"]
        n = min(len(ca), len(cb))
        differ = np.flatnonzero(ca[:n] != cb[:n])
        upto = int(differ[0]) + 1 if len(differ) else n  # position `upto - 1` saw the same prefix
        ia, ib = a["topk_ids"].reshape(-1, k)[:upto], b["topk_ids"].reshape(-1, k)[:upto]
        va, vb = a["topk_logprobs"].reshape(-1, k)[:upto], b["topk_logprobs"].reshape(-1, k)[:upto]
        compared += upto
        same_ids &= bool(np.array_equal(ia, ib))
        max_diff = max(max_diff, float(np.abs(va - vb).max()))
        padding_in_topk += int((ib >= tokens).sum())
    share = {
        name: float(np.mean(np.concatenate([o["completion_ids"] for o in outs]) >= tokens))
        for name, outs in (("without", plain), ("with", masked))
    }
    return {
        "padding_share_sampled_without": share["without"],
        "padding_share_sampled_with": share["with"],
        "topk_positions_compared": compared,
        "topk_ids_identical": same_ids,
        "topk_logprob_max_abs_diff": max_diff,
        "padding_entries_in_compared_topk": padding_in_topk,
    }


def arms(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Sampling settings: none; raykd's own for this teacher (`sampling_params`: for few padding rows, a
    bias of -inf on each); the other restriction vLLM offers, every token id as allowed_token_ids."""
    from raykd.spec import parse_spec
    from raykd.traces.checks import TeacherRows
    from raykd.traces.pipeline import sampling_params

    generation = {"temperature": 1.0, "top_p": 1.0, "max_tokens": args.max_tokens, "logprobs_k": args.k}
    spec = parse_spec(
        {
            "name": "bench",
            "teacher": {"model": "embedded"},
            "student": {"model": "embedded"},
            "generation": generation,
            "sweep": {"truncation": [1.0], "segments": [["cot"]]},
            "output": {"dir": "runs"},
        }
    )
    rows = TeacherRows(list(range(args.tokens)), list(range(args.tokens, args.rows)))
    return {
        "without": sampling_params(spec),
        "raykd": sampling_params(spec, rows),
        "allowed_token_ids": {**sampling_params(spec), "allowed_token_ids": rows.tokens},
    }


def layout(folder: Path, single: bool, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 300, size=32).tolist() for _ in range(args.prompts)]
    settings = arms(args)
    llm = engine(folder, single, args.k)
    try:
        run(llm, prompts[:4], settings["without"])  # warm-up
        times: dict[str, list[float]] = {name: [] for name in settings}
        outs: dict[str, list[dict]] = {}
        for _ in range(args.rounds):
            for name, sampling in settings.items():
                seconds, outs[name] = run(llm, prompts, sampling)
                times[name].append(seconds)
    finally:
        llm.shutdown()
    best = {name: min(values) for name, values in times.items()}
    result: dict[str, Any] = {"times_s": times, "best_s": best}
    result["raykd_restriction"] = [
        key for key in ("logit_bias", "allowed_token_ids") if key in settings["raykd"]
    ]
    for name in ("raykd", "allowed_token_ids"):
        result[name] = {
            "ratio_over_without": best[name] / best["without"],
            "overhead_ms_per_request": 1000 * (best[name] - best["without"]) / args.prompts,
            **compare(outs["without"], outs[name], args.k, args.tokens),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=151936, help="embedding rows (Qwen3-8B: 151936)")
    parser.add_argument("--tokens", type=int, default=151669, help="ids the tokenizer holds (Qwen3: 151669)")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--k", type=int, default=8, help="top-k logprobs per generated token")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp) / "padded", args.rows, args.tokens)
        result = {
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "model": "random Llama, 2 layers, hidden 64; padding rows = 30 x real rows",
            "vllm_default_layout": layout(folder, False, args),
            "single_process": layout(folder, True, args),
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
