"""Engine start on CPU: vLLM's default process layout against raykd's single-process engine, side by side.

Each trial's evaluation starts one vLLM engine for a tiny student, in a Ray actor of one CPU
(`raykd.engine.vllm_engine.run_engine`). With vLLM's defaults an engine on CPU is three processes (the
actor, an EngineCore process and a worker process), and each imports torch and vLLM;
`raykd.engine.config.EngineConfig.single_process` ('auto': on CPU) runs all of it in the actor. This starts
engines exactly so, alternating the two settings in one Ray session, and times what a trial waits for:

    engine_s    actor created -> constructor done (vLLM import, engine processes, model load, KV cache)
    generate_s  a small greedy batch (the same completions either way: checked)
    shutdown_s  VllmEngine.shutdown, then the actor killed

    flock /tmp/raykd-locks/heavy python benchmarks/engine_start.py --rounds 3 \
        --out benchmarks/results/engine_start.json

``--model`` defaults to the newest embedded student in the test cache (~/.cache/raykd-tests/embedded).
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
sys.path.insert(0, str(ROOT))
SETTINGS = {"vllm_default": False, "single_process": True}
TIMES = ("engine_s", "generate_s", "shutdown_s", "total_s")


def default_model() -> Path:
    found = sorted((Path.home() / ".cache" / "raykd-tests" / "embedded").glob("*/student/config.json"))
    if not found:
        raise SystemExit("no embedded student in ~/.cache/raykd-tests/embedded: pass --model FOLDER")
    return max(found, key=lambda p: p.stat().st_mtime).parent


def prompts_for(model: str) -> list[list[int]]:
    from raykd.chat import chat_prompt_ids, load_tokenizer

    tokenizer = load_tokenizer(model)
    return [chat_prompt_ids(tokenizer, f"cups 5 , ball under {i % 5 + 1} . swaps : 1 2") for i in range(8)]


def one(model: str, single: bool, prompts: list[list[int]], log_file: str) -> dict[str, Any]:
    """One engine in a fresh Ray actor of one CPU, as evaluation starts it; the timings as a dict."""
    import ray

    from raykd.engine.config import EngineConfig
    from raykd.engine.vllm_engine import VllmEngine

    config = EngineConfig(
        model=model, tokenizer=model, max_model_len=512, single_process=single, log_file=log_file
    )
    start = time.perf_counter()
    actor = ray.remote(VllmEngine).options(num_cpus=1, max_restarts=0).remote(config)
    ray.get(actor.__ray_ready__.remote())
    ready = time.perf_counter()
    sampling = {"temperature": 0.0, "max_tokens": 48}
    outputs = ray.get(actor.generate.remote(prompts, list(range(len(prompts))), sampling))
    generated = time.perf_counter()
    ray.get(actor.shutdown.remote(), timeout=60)
    ray.kill(actor)
    done = time.perf_counter()
    return {
        "engine_s": round(ready - start, 2),
        "generate_s": round(generated - ready, 2),
        "shutdown_s": round(done - generated, 2),
        "total_s": round(done - start, 2),
        "completion_tokens": int(sum(len(o["completion_ids"]) for o in outputs)),
        "completions": [o["completion_ids"].tolist() for o in outputs],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model folder (with its tokenizer)")
    parser.add_argument("--rounds", type=int, default=3, help="starts per setting, alternating")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engine_start.json"))
    args = parser.parse_args(argv)
    import ray

    model = str(args.model or default_model())
    prompts = prompts_for(model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The engines' own output goes to a log, as a trial's does (not kept in results/: it is long).
    log_file = str(Path(tempfile.gettempdir()) / f"raykd-engine-start-{os.getpid()}.log")
    os.environ["VLLM_LOGGING_LEVEL"] = "INFO"  # the log file then shows where a start spends its time
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in SETTINGS}
    try:
        for r in range(args.rounds):
            order = list(SETTINGS) if r % 2 == 0 else list(reversed(SETTINGS))  # neither always goes first
            for name in order:
                runs[name].append(one(model, SETTINGS[name], prompts, log_file))
                print(f"round {r}: {name} {runs[name][-1]}"[:200], flush=True)
    finally:
        ray.shutdown()
    same = all(
        a["completions"] == b["completions"]
        for a, b in zip(runs["vllm_default"], runs["single_process"], strict=True)
    )
    median = {
        name: {k: statistics.median(run[k] for run in rows) for k in TIMES} for name, rows in runs.items()
    }
    for rows in runs.values():
        for run in rows:
            run.pop("completions")
    single, default = median["single_process"], median["vllm_default"]
    result = {
        "model": model,
        "cores": len(os.sched_getaffinity(0)),
        "rounds": args.rounds,
        "median": median,
        "ratio_single_to_default": {k: round(single[k] / default[k], 3) for k in TIMES if default[k]},
        "same_completions": same,
        "vllm_log": log_file,
        "runs": runs,
        "command": "python benchmarks/engine_start.py " + " ".join(sys.argv[1:]),
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median", "ratio_single_to_default", "same_completions")}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
