"""Teacher generation throughput: the vLLM actor pool (raykd.traces on Ray Data) against transformers.

    python benchmarks/generation.py --out benchmarks/results/generation.json        # embedded teacher, CPU
    python benchmarks/generation.py --out /tmp/g.json --teacher DIR --tokenizer DIR --prompts 512

Writes {"vllm_tokens_per_s": A, "hf_tokens_per_s": B, "speedup": A / B, ...} (target on CPU: speedup >= 3).

Same model, same prompts (chat-formatted built-in task problems), same settings on both sides: sampling
temperature / top-p, max_tokens, and the teacher's top-k logprobs at every generated position (vLLM reports
them; transformers returns the logits and the top-k of their log-softmax is taken, as KD needs them).
- vLLM: `generate_traces` end to end (render, engine actors, answer check, segmentation, Parquet shards) into
  a fresh folder; tokens/s counts every generated token from the moment the first engine was ready to the
  last shard written (engine start-up is reported apart, it is paid once per sweep).
- transformers: the same model in float32, batches of --hf-batch-size left-padded prompts, `generate` with
  `output_logits`; tokens/s counts generated tokens up to and including EOS over the wall time of all batches
  (model load excluded). A batch runs until its longest member ends, as `generate` does. It runs with the
  faster of 1 thread and all cores (a one-batch probe decides; both figures are in the JSON).
vLLM runs --repeats times and its fastest run counts (the machine may be shared); transformers runs once, with
the thread count its probe found faster.
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
sys.path.insert(0, str(ROOT))  # run from anywhere without installing raykd


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--teacher", help="teacher HF folder (default: the embedded cups teacher)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the teacher's, or the embedded one)")
    p.add_argument("--cache-dir", default=str(ROOT / "runs" / "cache" / "embedded"), help="embedded cache")
    p.add_argument("--task", default="cups", choices=("cups", "modchain"))
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--k", type=int, default=8, help="top-k logprobs kept per generated position")
    p.add_argument("--engines", type=int, default=1)
    p.add_argument("--vllm-batch-size", type=int, default=256, help="problems per engine call")
    p.add_argument("--hf-batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="vLLM runs; the fastest counts")
    return p.parse_args(argv)


def _models(args: argparse.Namespace) -> tuple[str, str]:
    if args.teacher:
        return args.teacher, args.tokenizer or args.teacher
    from raykd.embedded.bootstrap import bootstrap

    built = bootstrap(args.task, 0, args.cache_dir)
    return str(built.teacher_dir), str(built.tokenizer_dir)


def run_vllm(args: argparse.Namespace, teacher: str, tokenizer: str, problems: list[Any]) -> dict[str, Any]:
    import ray

    from raykd.spec import parse_spec
    from raykd.traces import generate_traces

    spec = parse_spec(
        {
            "name": "bench",
            "problems": {"source": "builtin", "task": args.task},
            "teacher": {"model": teacher},
            "student": {"model": teacher},
            "generation": {
                "temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens,
                "logprobs_k": args.k, "filter": "keep_all", "engines": args.engines, "gpus_per_engine": 0,
            },
            "sweep": {"truncation": [1.0], "segments": [["cot"]]},
            "output": {"dir": "unused"},
        }
    )  # fmt: skip
    ray.init(num_cpus=max(4, args.engines + 2), include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as out:  # fresh: nothing reused from an earlier run
            start = time.perf_counter()
            summary = generate_traces(
                spec,
                problems,
                tokenizer,
                teacher,
                out,
                shard_size=len(problems),
                batch_size=args.vllm_batch_size,
            ).summary
            total = time.perf_counter() - start
    finally:
        ray.shutdown()
    return {
        "vllm_tokens_per_s": summary["tokens_per_s"],
        "vllm_tokens": summary["generated_tokens"],
        "vllm_engine_startup_s": summary["engine_startup_s"],
        "vllm_total_s": round(total, 1),
        "trace_bytes_per_token": round(summary["bytes_per_token"], 1),
        "traces": {s: summary[s] for s in ("correct", "wrong", "unparseable", "truncated")},
    }


def run_hf(args: argparse.Namespace, teacher: str, tokenizer_dir: str, problems: list[Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raykd.traces.stages import chat_prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    prompts = [chat_prompt_ids(tokenizer, p.prompt) for p in problems]
    batches = [prompts[b : b + args.hf_batch_size] for b in range(0, len(prompts), args.hf_batch_size)]
    # transformers' best thread count depends on the machine (on a shared 2-core box, 2 OpenMP threads ran
    # 20x slower than 1): time one batch with each candidate, then run everything with the faster.
    probe = {n: hf_batches(model, tokenizer, batches[:1], args, n) for n in sorted({1, os.cpu_count() or 1})}
    threads = max(probe, key=lambda n: probe[n][0] / probe[n][1])
    tokens, seconds = hf_batches(model, tokenizer, batches, args, threads)
    return {
        "hf_tokens_per_s": round(tokens / seconds, 1),
        "hf_tokens": tokens,
        "hf_seconds": round(seconds, 1),
        "hf_threads": threads,
        "hf_probe_tokens_per_s": {n: round(t / s, 1) for n, (t, s) in probe.items()},
    }


def hf_batches(
    model: Any, tokenizer: Any, batches: list[list[list[int]]], args: Any, threads: int
) -> tuple[int, float]:
    """(generated tokens up to and including EOS, seconds) for `generate` over ``batches``."""
    import torch

    torch.set_num_threads(threads)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    tokens, start = 0, time.perf_counter()
    for batch in batches:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=args.max_tokens, top_k=0,
                do_sample=args.temperature > 0, temperature=args.temperature or None, top_p=args.top_p,
                eos_token_id=eos, pad_token_id=pad, output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
            logprobs = torch.log_softmax(torch.stack(out.logits, 1).float(), -1)
            torch.topk(logprobs, args.k, dim=-1)  # what KD keeps per position, as vLLM reports it
        for row in out.sequences[:, width:].tolist():
            tokens += row.index(eos) + 1 if eos in row else len(row)
    return tokens, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from raykd.problems.tasks import make_problems

    teacher, tokenizer = _models(args)
    problems = make_problems(args.task, "train", args.prompts, seed=0)
    vllm = max((run_vllm(args, teacher, tokenizer, problems) for _ in range(args.repeats)),
               key=lambda r: r["vllm_tokens_per_s"])  # fmt: skip
    hf = run_hf(args, teacher, tokenizer, problems)
    result = {
        "vllm_tokens_per_s": vllm["vllm_tokens_per_s"],
        "hf_tokens_per_s": hf["hf_tokens_per_s"],
        "speedup": round(vllm["vllm_tokens_per_s"] / hf["hf_tokens_per_s"], 2),
        **{k: v for k, v in vllm.items() if k != "vllm_tokens_per_s"},
        **{k: v for k, v in hf.items() if k != "hf_tokens_per_s"},
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "teacher": teacher,
            "tokenizer": tokenizer,
            "cpus": os.cpu_count(),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
