"""Run a validated sweep end to end: models -> problems -> teacher traces -> Tune grid -> results.

Each stage is resumable: the embedded models and the traces are cached by content, finished trials keep a
record and are skipped, unfinished trials resume from their last Ray Train checkpoint.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from raykd import _compat
from raykd.evalsets import EvalSetError, read_sets, write_sets_file
from raykd.evaluate import start_shared_engine, stop_shared_engine
from raykd.files import write_json_atomic, write_jsonl_atomic
from raykd.identity import Resume, plan_resume, run_identity
from raykd.lock import FolderLocked, driver_lock
from raykd.models import ModelError, ResolvedModel, check_pair, forwarded_env, resolve_models
from raykd.plan import TRIAL_DRIVER, ModelPaths, Plan, TrialConfig, trial_config
from raykd.report import References, write_results
from raykd.spec import SweepSpec
from raykd.trial import FAILED, OK, mark_started, read_record, record_head, run_trial, write_record

# Settings every Ray process needs; set before ray.init so local workers inherit them.
RAY_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    # The Ray dashboard's Train page lists every Train V2 run (so every trial) only with this set.
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
    # vLLM's INFO lines (several dozen per engine start) bury the sweep's own progress; warnings still show.
    "VLLM_LOGGING_LEVEL": "WARNING",
    # Each Train V2 worker's print() once on the console, not twice (a Ray 2.60 workaround).
    **_compat.RAY_PRINT_ONCE_ENV,
}
CPU_ENV = {"DS_ACCELERATOR": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
# Only for a Ray this driver starts on its own machine, which no cloud preempts: Train V2 would otherwise
# start a PreemptionWatcher actor (one more process polling for node drains) with each trial's worker group.
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

# A custom resource only the head node has (cluster/ configs give it 1000): trial drivers ask for one unit, so
# they (and the Train controllers Ray places beside them) never land on spot GPU workers.
HEAD_RESOURCE = "raykd_head"


@dataclass(frozen=True)
class Models:
    tokenizer_dir: str
    teacher_dir: str
    student_dir: str
    teacher_accuracy: float | None = None
    student_accuracy: float | None = None
    # Hub models: the resolved commit (None for a folder or the embedded pair), and how results name them.
    teacher_revision: str | None = None
    student_revision: str | None = None
    teacher_label: str = "embedded"
    student_label: str = "embedded"


class StageClock:
    """Wall time of each stage of a run, printed as it ends and written to ``timings.json`` at the end."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.stages: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = round(now - self.last, 1)
        self.last = now

    def write(self, out: Path) -> float:
        total = round(time.perf_counter() - self.started, 1)
        write_json_atomic(out / "timings.json", {"stages_s": self.stages, "total_s": total})
        return total


def _log(msg: str) -> None:
    print(f"[raykd {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class ClusterError(RuntimeError):
    """The Ray cluster cannot run this sweep as configured; the message names the fix."""


def start_ray(spec: SweepSpec, cache_dir: Path) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), or start a local Ray."""
    import ray

    env = dict(RAY_ENV, TORCH_EXTENSIONS_DIR=str(cache_dir / "torch_extensions"))
    if spec.resources.gpus_per_worker == 0 or spec.generation.gpus_per_engine == 0:
        env |= CPU_ENV
    if not os.environ.get("RAY_ADDRESS") and not ray.is_initialized():
        env |= LOCAL_ENV
    for key, value in env.items():
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            # Hugging Face settings (cache, offline mode) travel with the job; a token never does (the job's
            # runtime_env is shown on the dashboard): raykd.models says where it comes from instead.
            env_vars = {k: os.environ[k] for k in env} | forwarded_env()
            ray.init(runtime_env={"env_vars": env_vars})
        else:
            ray.init(
                num_cpus=spec.resources.num_cpus,
                resources={HEAD_RESOURCE: 1000},
                include_dashboard=True,
                dashboard_host="127.0.0.1",
            )
    if HEAD_RESOURCE not in ray.cluster_resources():
        raise ClusterError(
            f"the Ray cluster has no '{HEAD_RESOURCE}' resource, so trial drivers cannot be placed on "
            "the head; "
            f"start the head with: ray start --head --resources='{{\"{HEAD_RESOURCE}\": 1000}}' "
            "(the configs in cluster/ do this)"
        )


def prepare_models(
    spec: SweepSpec, cache_dir: Path, resolved: dict[str, ResolvedModel] | None = None
) -> Models:
    """Local folders for the teacher, its tokenizer and the student base: hub ids resolved into the HF cache
    (``resolved``: already done by the caller, raykd.models.resolve_models), the embedded pair built."""
    if spec.teacher.model != "embedded":
        resolved = resolved or resolve_models(spec)
        teacher, student = resolved["teacher"], resolved["student"]
        _log(f"models: teacher {teacher.label}, student {student.label}")
        return Models(
            str(teacher.path),
            str(teacher.path),
            str(student.path),
            teacher_revision=teacher.revision,
            student_revision=student.revision,
            teacher_label=teacher.label,
            student_label=student.label,
        )
    from raykd.embedded import bootstrap

    _log(f"embedded models for task '{spec.problems.task}' (built once, cached under {cache_dir})")
    built = bootstrap(
        spec.problems.task, spec.problems.seed, cache_dir / "embedded", steps=spec.problems.steps
    )
    # The teacher's folder holds the same tokenizer: engines get one folder for both, as with a hub model
    # (vLLM reads a separate tokenizer folder as a model config first, fails, and retries after 2 s).
    return Models(
        str(built.teacher_dir),
        str(built.teacher_dir),
        str(built.student_dir),
        built.teacher_accuracy,
        built.student_accuracy,
    )


def load_problems(spec: SweepSpec) -> tuple[list[Any], list[Any]]:
    p = spec.problems
    if p.source == "builtin":
        from raykd.problems.tasks import make_problems

        kw = {"steps": p.steps}
        return (
            make_problems(p.task, "train", p.train_size, p.seed, **kw),
            make_problems(p.task, "eval", p.eval_size, p.seed, **kw),
        )
    if p.source == "traces":
        from raykd.traces.existing import trace_problems

        problems = trace_problems(p.path)
    else:
        from raykd.problems.sources import load_problems as load_file

        problems = load_file(p.path, p.prompt_field, p.answer_field)
    eval_part, train_part = problems[: p.eval_size], problems[p.eval_size :][: p.train_size]
    return train_part, eval_part


def model_paths(spec: SweepSpec, models: Models) -> ModelPaths:
    """The trials' view of the models: local folders, and how results name them."""
    return ModelPaths(
        student_dir=models.student_dir,
        teacher_dir=models.teacher_dir,
        tokenizer_dir=models.tokenizer_dir,
        trust_remote_code=spec.student.trust_remote_code,
        teacher_label=models.teacher_label,
        student_label=models.student_label,
    )


def _trial_name(trial: Any) -> str:
    return trial.config["trial"]


def run_trials(spec: SweepSpec, plan: Plan, configs: list[TrialConfig]) -> None:
    """Run the pending trials in a Tune grid; a failed trial gets a 'failed' record, the others go on."""
    from ray import tune

    # Ctrl-C must end the sweep at once (raykd.run.run_sweep stops Ray): Tune's own handler would instead
    # wait for every running trial to stop and save its state.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    by_id = {c.trial_id: c for c in configs}
    # One evaluation engine for every trial (CPU evaluation only; raykd.evaluate.SharedEngine says why).
    shared = start_shared_engine(configs[0].eval_engine.gpus, configs[0].eval_engine.resources)
    # Tune's grid (and its console table) is over trial ids only; each trial looks its config up by id.
    # The trial holds no CPU, a unit of the head's resource; its trainer and evaluator ask for their own.
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, configs={tid: c.model_dump() for tid, c in by_id.items()}, shared_engine=shared
        ),
        {"cpu": TRIAL_DRIVER.cpus, HEAD_RESOURCE: 1},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(_launch_order(by_id, plan.concurrent))},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=plan.concurrent,
            reuse_actors=False,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(Path(plan.output_dir) / "tune"),
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            verbose=1,
        ),
    )
    try:
        results = tuner.fit()
    finally:
        stop_shared_engine(shared)
    for result in results:
        cfg = by_id[result.config["trial"]]
        finished = (read_record(plan.output_dir, cfg.trial_id) or {}).get("status") == OK
        if result.error is not None and not finished:
            lines = str(result.error).strip().splitlines() or [type(result.error).__name__]
            error = lines[-1][:300]
            write_record(plan.output_dir, cfg.trial_id, {**record_head(cfg, FAILED), "error": error})


def _launch_order(by_id: dict[str, TrialConfig], concurrent: int) -> list[str]:
    """Trials side by side: longest first (training time follows the kept share), so the short ones fill in
    at the end and the slots finish together instead of one running a long trial alone. One at a time,
    the order changes nothing: the grid's own."""
    if concurrent <= 1:
        return list(by_id)
    return sorted(by_id, key=lambda tid: -by_id[tid].fraction)


def _run_pending(
    spec: SweepSpec, plan: Plan, resume: Resume, models: ModelPaths, paths: dict[str, str]
) -> None:
    """The trials not finished under their current settings (raykd.identity.plan_resume), each
    marked started with its identity, then run in one Tune grid."""
    pending = resume.pending
    _log(f"{len(plan.trials) - len(pending)} trial(s) already finished, {len(pending)} to run")
    if not pending:
        return
    configs = []
    for trial in pending:
        identity = resume.identities[trial.trial_id]
        mark_started(plan.output_dir, trial.trial_id, identity)
        configs.append(trial_config(spec, plan, trial, models, paths, identity))
    run_trials(spec, plan, configs)


def run_sweep(spec: SweepSpec, plan: Plan) -> int:
    """Run the sweep holding the output folder's driver lock; exit codes as in raykd.sweep."""
    try:
        with driver_lock(plan.output_dir):
            return _run_sweep(spec, plan)
    except FolderLocked as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _stop_ray()
        print(
            "\ninterrupted: finished trials and trace shards are kept; the same command continues the sweep",
            flush=True,
        )
        return 130


def _stop_ray() -> None:
    """Disconnect (and end a local Ray this driver started): the trials it owns end with it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _run_sweep(spec: SweepSpec, plan: Plan) -> int:
    out = Path(plan.output_dir)
    # Embedded models and DeepSpeed's compiled extension; RAYKD_CACHE shares them between output folders.
    cache_dir = Path(os.environ.get("RAYKD_CACHE") or Path(spec.output.dir) / "cache").expanduser().resolve()
    clock = StageClock()
    try:
        resolved = resolve_models(spec)  # hub ids -> local snapshots, before any Ray work
        check_pair(spec, resolved)  # one vocabulary and a chat template, before Ray and any generation
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        start_ray(spec, cache_dir)
    except ClusterError as e:
        print(f"error: {e}")
        return 2
    clock.lap("ray_start")
    train_problems, eval_problems = load_problems(spec)
    clock.lap("problems")
    _log(f"{len(train_problems)} training problems, {len(eval_problems)} held-out problems")
    try:  # the benchmark files, checked before the models are built and any generation or training
        eval_sets = read_sets(spec, eval_problems)
    except EvalSetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    models = prepare_models(spec, cache_dir, resolved)
    clock.lap("models")

    from raykd.traces import generate_traces

    # The pair (one vocabulary, a chat template) was checked above, before Ray: check_pair.
    traces = generate_traces(spec, train_problems, models.tokenizer_dir, models.teacher_dir, spec.output.dir)
    _log(f"traces: {traces.path} {traces.summary}")
    clock.lap("traces")

    eval_path = write_jsonl_atomic(out / "eval_problems.jsonl", (asdict(p) for p in eval_problems))

    # Every problem a trial is evaluated on is part of its identity: a changed benchmark file reruns it.
    shared = run_identity(models, traces.key, eval_problems + [p for s in eval_sets for p in s.problems])
    refs = References(models.teacher_accuracy, models.student_accuracy)  # the embedded pair measured itself
    if models.teacher_accuracy is None or eval_sets:  # the trials' evaluator on every set, cached by content
        from raykd import references

        refs = references.measure(spec, models, eval_sets, eval_problems, out, shared)
        clock.lap("references")
    resume = plan_resume(spec, plan.trials, plan.output_dir, shared)
    paths = {"traces_path": str(traces.path), "eval_problems_path": str(eval_path)}
    if eval_sets:
        paths["eval_sets_path"] = str(write_sets_file(eval_sets, out / "eval_sets.json"))
    _run_pending(spec, plan, resume, model_paths(spec, models), paths)
    clock.lap("trials")

    records = [resume.finished(plan.output_dir, t) for t in plan.trials]
    done = [r for r in records if r is not None]
    refs.models = {"teacher": models.teacher_label, "student": models.student_label}
    table = write_results(done, out, refs)
    clock.lap("report")
    print("\n" + table + "\n")
    files = ("results.md", "results.csv", "results.json", "frontier.png")
    print("results: " + "  ".join(str(out / name) for name in files))
    print(f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}")
    print(f"students (HF format): {out / 'trials'}/<trial>/student")
    total = clock.write(out)
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in clock.stages.items())
    print(f"wall time: {total:.0f} s ({stages}; {out / 'timings.json'})")
    incomplete = len(done) < len(plan.trials) or any(r["status"] != OK for r in done)
    if incomplete:
        print("sweep incomplete: run the same command again to retry the failed or missing trials")
    return 1 if incomplete else 0
