"""Evaluate a student with vLLM: sample answers to held-out problems or named evaluation sets, check them,
report pass@1 (and pass@k).

Called inside a Ray Tune trial after training (`raykd.trial.run_trial`), or anywhere else:

    from raykd.evaluate import evaluate_student
    result = evaluate_student("runs/tiny/trials/f0.50_CoT_s0/student", problems, spec.evaluation, "exact")

With Ray running, the engine lives in its own Ray actor that asks for its own CPU/GPU (outside the calling
trial's placement group) and is killed afterwards, so its memory goes back with its process. Without Ray it
runs in this process and is shut down before returning. A sweep's CPU evaluations share one engine instead
(`SharedEngine`, started by the driver with `start_shared_engine`): each student's weights are loaded into it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raykd.engine import checks
from raykd.engine.config import EngineConfig, request_seed
from raykd.engine.vllm_engine import VllmEngine, run_engine
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
    **engine: Any,
) -> EvalResult:
    """Sample ``eval_spec.samples`` completions per problem (temperature, top_p, max_tokens from
    ``eval_spec``: raykd.spec.EvaluationSpec) and score them with ``check_kind`` ('exact' or 'math').
    ``engine``: the keyword arguments of `evaluate_sets`."""
    from raykd.evalsets import EvalSet

    if not problems:
        raise ValueError("no eval problems; set problems.eval_size to at least 1")
    one = EvalSet(
        name="evaluation",
        problems=problems,
        check=check_kind,
        samples=eval_spec.samples,
        temperature=eval_spec.temperature,
        top_p=eval_spec.top_p,
        max_tokens=eval_spec.max_tokens,
    )
    return evaluate_sets(model_dir, [one], **engine)["evaluation"]


def evaluate_sets(
    model_dir: str | Path,
    sets: list[Any],
    *,
    tokenizer_dir: str | Path | None = None,
    gpus: int = 0,
    num_cpus: float = 1,
    resources: dict[str, float] | None = None,
    trust_remote_code: bool = False,
    log_file: str | None = None,
    completions_dir: str | Path | None = None,
    shared: Any | None = None,
) -> dict[str, EvalResult]:
    """Evaluate every set (`raykd.evalsets.EvalSet`: problems, check, samples, temperature, top-p, max
    tokens) with one engine, in one batch: each request carries its set's sampling. Returns an EvalResult
    per set name; their ``seconds`` is the whole evaluation's (the sets share the batch).

    Prompts are rendered with the chat template of ``tokenizer_dir`` exactly as the training prompts were
    (`raykd.chat.chat_prompt_ids`), and sampling stops on that template's end-of-turn token and on the
    model's own EOS ids (raykd.chat.stop_ids). tokenizer_dir defaults to model_dir (a trained student's
    folder holds the traces' tokenizer and template); for a base model name the teacher's. gpus /
    num_cpus / resources (custom) are what the engine actor asks Ray for. With ``completions_dir``, every
    completion is kept in ``<completions_dir>/<set>.jsonl`` (problem id, sample, text, finish reason,
    status), so a result can be recounted or read. ``shared``: a `SharedEngine` actor (`start_shared_engine`)
    to generate with instead of an engine of this call's own.
    """
    from raykd import chat

    start = time.perf_counter()
    model_dir = str(model_dir)
    tokenizer_dir = str(tokenizer_dir or model_dir)
    checks.check_model_path(model_dir, "evaluated model")
    empty = [s.name for s in sets if not s.problems]
    if not sets or empty:
        raise ValueError(f"no eval problems in {', '.join(empty) or 'any set'}; give each set problems")
    tokenizer = chat_tokenizer(tokenizer_dir, trust_remote_code)
    batch = _requests(
        sets, tokenizer, chat.stop_ids(tokenizer, model_dir), checks.model_context(model_dir), model_dir
    )
    config = EngineConfig(
        model=model_dir,
        tokenizer=tokenizer_dir,
        max_model_len=batch.max_model_len,
        gpus=gpus,
        trust_remote_code=trust_remote_code,
        setting="evaluation",
        log_file=log_file,  # the engine actor's vLLM output (raykd.logs); unused without Ray
    )
    outputs = _generate(config, batch, num_cpus, resources, shared)
    texts = tokenizer.batch_decode([o["completion_ids"] for o in outputs], skip_special_tokens=False)
    seconds, end_of_turn = time.perf_counter() - start, chat.end_of_turn(tokenizer)
    results, first = {}, 0
    for eval_set in sets:
        size = len(eval_set.problems) * eval_set.samples
        done = outputs[first : first + size], texts[first : first + size]
        results[eval_set.name] = _score(eval_set, *done, seconds, end_of_turn, completions_dir)
        first += size
    return results


def _generate(
    config: EngineConfig, batch: _Batch, num_cpus: float, resources: dict | None, shared: Any | None
) -> list[dict]:
    if shared is not None:
        import ray

        try:
            return ray.get(shared.generate.remote(config, batch.prompts, batch.seeds, batch.sampling))
        except ray.exceptions.RayActorError as error:
            # The shared engine's process is gone (killed, out of memory): an engine of this call's own.
            print(
                f"[raykd] the shared evaluation engine is gone ({error}); starting this trial's own",
                flush=True,
            )
    return run_engine(config, batch.prompts, batch.seeds, batch.sampling, num_cpus, resources)


class SharedEngine:
    """One vLLM engine for all the CPU evaluations of a sweep: a Ray actor the driver starts
    (`start_shared_engine`) and hands to every trial. A new engine per trial costs a Ray worker process,
    vLLM's import and the engine's start-up, about 15 s of every trial on 2 cores; here the first evaluation
    builds the engine, and each later student's weights are loaded into it in place (vLLM's
    ``reload_weights``, the path RL weight updates take), with the prefix cache dropped.

    It serves what a fresh engine would: the same EngineConfig apart from the model folder, and a student
    folder whose every file but the weights (config, generation config, tokenizer, chat template) matches
    the one the engine was built from; anything else gets a new engine. A Ray actor runs one call at a time,
    so a reload never overlaps a generation.
    """

    def __init__(self) -> None:
        self.engine: VllmEngine | None = None
        self.key: tuple | None = None
        self.loaded: tuple = ()  # _weights_stamp of the folder whose weights the engine holds

    def generate(
        self, config: EngineConfig, prompts: list[list[int]], seeds: list[int], sampling: list[dict[str, Any]]
    ) -> list[dict]:
        key = _engine_key(config)
        if self.engine is None or key != self.key:
            self._start(config, key)
        elif _weights_stamp(config.model) != self.loaded:
            try:
                self._reload(config)
            except Exception as error:  # a model vLLM cannot reload in place: a new engine serves it
                print(f"[raykd] reloading weights failed ({error}); starting a new engine", flush=True)
                self._start(config, key)
        assert self.engine is not None
        self.engine.llm.reset_prefix_cache()
        return self.engine.generate(prompts, seeds, sampling)

    def _start(self, config: EngineConfig, key: tuple) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        self.engine, self.key, self.loaded = VllmEngine(config), key, _weights_stamp(config.model)

    def _reload(self, config: EngineConfig) -> None:
        assert self.engine is not None
        started = time.perf_counter()
        self.engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": config.model})
        self.loaded = _weights_stamp(config.model)
        if config.log_file:  # the engine's own start-up output is in the first student's log
            with open(config.log_file, "a") as log:
                log.write(
                    f"[raykd] weights of {config.model} loaded in {time.perf_counter() - started:.1f} s into "
                    f"the sweep's shared evaluation engine (its start-up: {self.engine.config.log_file})\n"
                )


def _engine_key(config: EngineConfig) -> tuple:
    """What an engine serves apart from its weights: the config without its folders and log, and the digest
    of every file but the weights in the model and tokenizer folders."""
    rest = dataclasses.replace(config, model="", tokenizer="", log_file=None)
    return rest, _side_files_digest(config.model), _side_files_digest(config.tokenizer)


def _side_files_digest(folder: str) -> str:
    if not Path(folder).is_dir():
        return folder
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and path.suffix not in WEIGHT_SUFFIXES:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _weights_stamp(folder: str) -> tuple:
    """The folder and its weight files' (name, size, mtime): a student saved again into the same folder (a
    retried trial) is not mistaken for the weights already loaded."""
    files = (
        sorted(p for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES)
        if Path(folder).is_dir()
        else []
    )
    return (folder, *((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))


def start_shared_engine(eval_gpus: int, resources: dict[str, float] | None = None) -> Any | None:
    """A `SharedEngine` actor for a sweep's evaluations, or None where they use GPUs (a held GPU would be
    one fewer for training; each trial then starts its own engine, as `evaluate_sets` does without it).

    It asks Ray for no CPU: it computes only while a trial evaluates, when that trial's training worker has
    returned its CPU, as a trial's own engine would; holding one for the whole sweep would take it from the
    training workers. The caller owns it: `stop_shared_engine` when the trials are done.
    """
    if eval_gpus:
        return None
    import ray

    actor = ray.remote(SharedEngine).options(
        num_cpus=0, resources=resources or {}, scheduling_strategy="DEFAULT", max_restarts=0
    )
    return actor.remote()


def stop_shared_engine(shared: Any | None) -> None:
    if shared is not None:
        import ray

        ray.kill(shared)


@dataclass(frozen=True)
class _Batch:
    """The requests of every set, in set, problem, sample order: prompt ids, seeds, sampling per request."""

    prompts: list[list[int]]
    seeds: list[int]
    sampling: list[dict[str, Any]]
    max_model_len: int


def _requests(sets: list[Any], tokenizer: Any, stops: list[int], context: int | None, model: str) -> _Batch:
    from raykd import chat

    prompts, seeds, settings, need = [], [], [], 0
    for eval_set in sets:
        ids = [chat.chat_prompt_ids(tokenizer, p.prompt) for p in eval_set.problems]
        lengths = {p.id: len(x) for p, x in zip(eval_set.problems, ids, strict=True)}
        where = "evaluation" if eval_set.name == "evaluation" else f"evaluation.sets ('{eval_set.name}')"
        need = max(need, checks.check_context(lengths, eval_set.max_tokens, context, where, model))
        params = sampling(eval_set, stops)
        for problem, prompt in zip(eval_set.problems, ids, strict=True):
            for k in range(eval_set.samples):
                prompts.append(prompt)
                seeds.append(request_seed(problem.id, k))
                settings.append(params)
    return _Batch(prompts, seeds, settings, need)


def _score(
    eval_set: Any,
    outputs: list[dict],
    texts: list[str],
    seconds: float,
    end_of_turn: int | None,
    completions_dir: str | Path | None,
) -> EvalResult:
    n = eval_set.samples
    answers = [p.answer for p in eval_set.problems for _ in range(n)]
    statuses = [
        status_of(text, answer, out["finish_reason"], eval_set.check)
        for text, answer, out in zip(texts, answers, outputs, strict=True)
    ]
    if completions_dir is not None:
        _keep_completions(
            Path(completions_dir) / f"{eval_set.name}.jsonl", eval_set, texts, outputs, statuses
        )
    correct = np.array([s == "correct" for s in statuses], np.float64).reshape(len(eval_set.problems), n)
    return summarize(correct, statuses, outputs, seconds, end_of_turn)


def _keep_completions(
    path: Path, eval_set: Any, texts: list[str], outputs: list[dict], statuses: list[str]
) -> None:
    from raykd.files import write_jsonl_atomic

    keys = [(p.id, k) for p in eval_set.problems for k in range(eval_set.samples)]
    rows = (
        {"id": pid, "sample": k, "text": text, "finish_reason": out["finish_reason"], "status": status}
        for (pid, k), text, out, status in zip(keys, texts, outputs, statuses, strict=True)
    )
    write_jsonl_atomic(path, rows)


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
