"""Evaluate a student with vLLM: sample answers to held-out problems, check them, report pass@1.

Called inside a Ray Tune trial after training (`raykd.trial.run_trial`), or anywhere else:

    from raykd.evaluate import evaluate_student
    result = evaluate_student("runs/tiny/trials/f0.50_CoT_s0/student", problems, spec.evaluation, "exact")

With Ray running, the engine lives in its own Ray actor that asks for its own CPU/GPU (outside the calling
trial's placement group) and is killed afterwards, so its memory goes back with its process. Without Ray it
runs in this process and is shut down before returning.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raykd.engine import checks
from raykd.engine.config import EngineConfig, request_seed
from raykd.engine.vllm_engine import run_engine
from raykd.metrics import pass_at_1, pass_at_ks, truncated_share
from raykd.problems.answers import STATUSES, status


@dataclass(frozen=True)
class EvalResult:
    """accuracy: pass@1 averaged over the samples of each problem, then over problems; stderr: its standard
    error across problems (sample std / sqrt(n_problems)); counts: samples per status; end_of_turn: samples
    whose last token is the chat template's end-of-turn token (a completion that stopped where the format
    ends a turn); pass_at_k / pass_at_k_stderr: the unbiased pass@k (raykd.metrics) for k = 1, 2, 4, ...,
    n_samples, empty with one sample; truncated_share: the share of samples that ran to max_tokens."""

    accuracy: float
    stderr: float
    n_problems: int
    n_samples: int
    counts: dict[str, int] = field(default_factory=dict)
    completion_tokens: int = 0
    seconds: float = 0.0
    end_of_turn: int = 0
    pass_at_k: dict[int, float] = field(default_factory=dict)
    pass_at_k_stderr: dict[int, float] = field(default_factory=dict)
    truncated_share: float = 0.0

    def share(self, status: str) -> float:
        """The share of all samples with this status (e.g. 'truncated': ran to max_tokens)."""
        return self.counts.get(status, 0) / max(1, sum(self.counts.values()))


def evaluate_student(
    model_dir: str | Path,
    problems: list[Any],
    eval_spec: Any,
    check_kind: str,
    *,
    tokenizer_dir: str | Path | None = None,
    gpus: int = 0,
    num_cpus: float = 1,
    resources: dict[str, float] | None = None,
    trust_remote_code: bool = False,
    log_file: str | None = None,
) -> EvalResult:
    """Sample ``eval_spec.samples`` completions per problem (temperature, top_p, max_tokens from
    ``eval_spec``: raykd.spec.EvaluationSpec) and score them with ``check_kind`` ('exact' or 'math').

    Prompts are rendered with the chat template of ``tokenizer_dir`` exactly as the training prompts were
    (`raykd.chat.chat_prompt_ids`), and sampling stops on that template's end-of-turn token and on the
    model's own EOS ids (raykd.chat.stop_ids). tokenizer_dir defaults to model_dir (a trained student's
    folder holds the traces' tokenizer and template); for a base model name the teacher's. gpus /
    num_cpus / resources (custom) are what the engine actor asks Ray for.
    """
    from raykd import chat

    start = time.perf_counter()
    model_dir = str(model_dir)
    tokenizer_dir = str(tokenizer_dir or model_dir)
    checks.check_model_path(model_dir, "evaluated model")
    if not problems:
        raise ValueError("no eval problems; set problems.eval_size to at least 1")
    tokenizer = chat_tokenizer(tokenizer_dir, trust_remote_code)
    prompts = [chat.chat_prompt_ids(tokenizer, p.prompt) for p in problems]
    lengths = {p.id: len(ids) for p, ids in zip(problems, prompts, strict=True)}
    context = checks.model_context(model_dir)
    config = EngineConfig(
        model=model_dir,
        tokenizer=tokenizer_dir,
        max_model_len=checks.check_context(lengths, eval_spec.max_tokens, context, "evaluation", model_dir),
        gpus=gpus,
        trust_remote_code=trust_remote_code,
        setting="evaluation",
        log_file=log_file,  # the engine actor's vLLM output (raykd.logs); unused without Ray
    )
    n = eval_spec.samples
    requests = [(i, s) for i in range(len(problems)) for s in range(n)]
    seeds = [request_seed(problems[i].id, s) for i, s in requests]
    outputs = run_engine(
        config,
        [prompts[i] for i, _ in requests],
        seeds,
        sampling(eval_spec, chat.stop_ids(tokenizer, model_dir)),
        num_cpus,
        resources,
    )
    texts = tokenizer.batch_decode([o["completion_ids"] for o in outputs], skip_special_tokens=False)
    statuses = [
        status_of(text, problems[i].answer, out["finish_reason"], check_kind)
        for (i, _), text, out in zip(requests, texts, outputs, strict=True)
    ]
    correct = np.array([s == "correct" for s in statuses], np.float64).reshape(len(problems), n)
    return summarize(correct, statuses, outputs, time.perf_counter() - start, chat.end_of_turn(tokenizer))


def chat_tokenizer(tokenizer_dir: str, trust_remote_code: bool) -> Any:
    """The tokenizer whose chat template renders the prompts; refused without one."""
    from raykd import chat

    tokenizer = chat.load_tokenizer(tokenizer_dir, trust_remote_code)
    if not tokenizer.chat_template:
        raise checks.SetupError(
            f"evaluation: the tokenizer in {tokenizer_dir} has no chat template, so the prompts cannot be "
            "rendered as the training prompts were; evaluate with the teacher's tokenizer (tokenizer_dir)"
        )
    return tokenizer


def sampling(eval_spec: Any, stops: list[int]) -> dict[str, Any]:
    """vLLM sampling settings of evaluation: ids only (no logprobs), stopping on ``stops``."""
    return {
        "temperature": eval_spec.temperature,
        "top_p": eval_spec.top_p,
        "max_tokens": eval_spec.max_tokens,
        "stop_token_ids": stops,
    }


def summarize(
    correct: np.ndarray,
    statuses: list[str],
    outputs: list[dict],
    seconds: float,
    end_of_turn: int | None = None,
) -> EvalResult:
    """correct: (problems, samples) 0/1 -> accuracy, stderr across problems, pass@k, counts."""
    accuracy, at_k = pass_at_1(correct), pass_at_ks(correct)
    return EvalResult(
        accuracy=accuracy.mean,
        stderr=accuracy.stderr,
        n_problems=correct.shape[0],
        n_samples=correct.shape[1],
        pass_at_k={k: e.mean for k, e in at_k.items()},
        pass_at_k_stderr={k: e.stderr for k, e in at_k.items()},
        truncated_share=truncated_share(o.get("finish_reason", "") for o in outputs),
        counts={s: statuses.count(s) for s in STATUSES},
        completion_tokens=int(sum(len(o["completion_ids"]) for o in outputs)),
        seconds=round(seconds, 2),
        end_of_turn=sum(
            1 for o in outputs if len(o["completion_ids"]) and int(o["completion_ids"][-1]) == end_of_turn
        ),
    )


def status_of(text: str, reference: str, finish_reason: str, kind: str) -> str:
    """Like the trace check: a completion cut at max_tokens is 'truncated' (and so not correct)."""
    return status(text, reference, finish_reason, kind)[0]
