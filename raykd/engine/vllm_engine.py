"""`VllmEngine`: one started `vllm.LLM` with the two calls raykd needs, and `run_engine` for one-off use.

A VllmEngine runs in a Ray Data actor (`raykd.traces.stages.GenerateBatch`, `ScoreBatch`: the teacher
pool), in a plain Ray actor (`run_engine`: evaluation inside a Tune trial) or in-process (no Ray). vLLM is
imported only inside the process that builds the engine.

Logprobs are vLLM's ``raw_logprobs`` (set explicitly; it is also vLLM 0.32's default): the model's
log-softmax over the full vocabulary *before* temperature, top-p or any logits processor, i.e. the teacher's
distribution at temperature 1, whatever temperature it sampled at. ``processed_logprobs`` would give the
tempered, top-p renormalised distribution instead, which is not what KD at temperature 1 needs. For prompt
logprobs both modes are identical (vLLM applies no processors to prompt positions).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import Any

import numpy as np

from raykd import _compat
from raykd.engine.config import EngineConfig, EngineStartError, start_error_message, unwrap_start_error
from raykd.engine.outputs import completion_arrays, completion_ids_only, flat_rows


class VllmEngine:
    """A started vLLM engine with the calls raykd needs: sample with top-k logprobs, and score sequences."""

    def __init__(self, config: EngineConfig):
        config.prepare_process()
        self.config = config
        console = sys.stdout
        if config.log_file:
            from raykd.logs import redirect_output

            console = redirect_output(config.log_file)
        start = time.perf_counter()
        try:
            from vllm import LLM

            self.llm = LLM(**config.engine_kwargs())
        except Exception as error:
            log = f" (vLLM's output: {config.log_file})" if config.log_file else ""
            raise EngineStartError(start_error_message(config, error) + log) from error
        self.startup_s = time.perf_counter() - start
        self.ready_at = time.time()  # wall clock, comparable across actors: tokens/s excludes startup
        where = f" (its log: {config.log_file})" if config.log_file else ""
        print(f"[raykd] vLLM engine for {config.model} ready in {self.startup_s:.1f} s{where}", file=console)
        console.flush()

    def generate(
        self, prompts: list[list[int]], seeds: list[int], sampling: dict[str, Any] | list[dict[str, Any]]
    ) -> list[dict]:
        """Sample one completion per prompt. ``sampling``: temperature, top_p, max_tokens, logprobs (k, or
        None for ids and finish reason only) and prompt_logprobs (k or None); one dict for every prompt, or
        a list with one per prompt (evaluation sets with their own settings, in one engine and one batch),
        all with the same logprobs. One dict per prompt (`raykd.engine.outputs.completion_arrays` /
        `completion_ids_only`)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        each = sampling if isinstance(sampling, list) else [sampling] * len(seeds)
        params = [
            SamplingParams(
                n=1,
                seed=seed,
                detokenize=False,  # texts are decoded from the ids by the caller; skips per-logprob decoding
                flat_logprobs=True,
                skip_special_tokens=False,
                **settings,
            )
            for seed, settings in zip(seeds, each, strict=True)
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
        )
        first = each[0] if each else {}
        k, prompt_k = first.get("logprobs"), first.get("prompt_logprobs")
        if k is None:  # evaluation: ids and finish reason only
            return [completion_ids_only(out) for out in outputs]
        return [completion_arrays(out, k, prompt_k) for out in outputs]

    def score(self, sequences: list[list[int]], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Teacher-force each sequence; per sequence the flat prompt logprobs as (ids, values), each
        (len - 1, k + 1): row j describes token j + 1, column 0 is that token itself, then the top-k."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            max_tokens=1, prompt_logprobs=k, detokenize=False, flat_logprobs=True, temperature=0.0
        )
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False
        )
        return [flat_rows(out.prompt_logprobs, k) for out in outputs]

    def shutdown(self) -> None:
        """Stop the engine (its process, if it has one) and free its memory (KV cache, weights)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            _compat.shutdown_vllm_engine(llm)
            del self.llm
        _compat.reap_engine_processes()


def run_engine(
    config: EngineConfig,
    prompts: list[list[int]],
    seeds: list[int],
    sampling: dict[str, Any] | list[dict[str, Any]],
    num_cpus: float,
    resources: dict[str, float] | None = None,
) -> list[dict]:
    """Generate with one engine: in its own Ray actor when Ray is up, else in this process; always freed.

    The actor asks for ``num_cpus``, ``config.gpus`` and ``resources`` (custom) of its own, outside the
    caller's placement group, and is killed afterwards, so its memory goes back with its process.
    """
    import ray

    if not ray.is_initialized():
        # This process is the caller's: keep vLLM's engine in processes of its own (no global seeding or
        # thread pinning here), and its output on this console.
        local = dataclasses.replace(config, log_file=None, single_process=False)
        engine = VllmEngine(local)
        try:
            return engine.generate(prompts, seeds, sampling)
        finally:
            engine.shutdown()
    # "DEFAULT" scheduling: a Tune trial's placement group (which captures child actors by default) holds only
    # the trial's own CPU; the engine asks the cluster for its own.
    actor_cls = ray.remote(VllmEngine).options(
        num_cpus=num_cpus,
        num_gpus=config.gpus,
        resources=resources or {},
        scheduling_strategy="DEFAULT",
        max_restarts=0,
    )
    actor = actor_cls.remote(config)
    try:
        return ray.get(actor.generate.remote(prompts, seeds, sampling))
    except ray.exceptions.RayActorError as error:
        raise unwrap_start_error(error) from error
    finally:
        # The actor may already be dead (a failed start); the kill frees whatever is left.
        with contextlib.suppress(Exception):
            ray.get(actor.shutdown.remote(), timeout=60)
        ray.kill(actor)
