"""The plan of a sweep: the grid of trials, the resources they ask Ray for, and each trial's `TrialConfig`.
Pure Python and pydantic, no Ray."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from raykd.evalsets import EvalSet, planned_sets
from raykd.grid import Trial, fraction_label, grid_trials
from raykd.spec import (
    AnswerCheck,
    EvaluationSpec,
    ResourcesSpec,
    Section,
    SweepSpec,
    TrainingSpec,
)


@dataclass(frozen=True)
class Resources:
    cpus: float
    gpus: float

    def __mul__(self, n: int) -> Resources:
        return Resources(self.cpus * n, self.gpus * n)

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpus + other.cpus, self.gpus + other.gpus)

    def __str__(self) -> str:
        return f"{self.cpus:g} CPU, {self.gpus:g} GPU"


# The Tune trial itself (a function trainable that drives a TorchTrainer) mostly waits: it holds no CPU,
# only a unit of the head's custom resource (raykd.run.HEAD_RESOURCE), so that the CPUs stay free for the
# trainer's workers, Ray Data's read tasks and the vLLM evaluator (holding one deadlocks small machines).
TRIAL_DRIVER = Resources(cpus=0, gpus=0)


@dataclass(frozen=True)
class Plan:
    trials: list[Trial]
    per_trial: Resources
    concurrent: int
    generation: Resources
    output_dir: str

    @property
    def peak(self) -> Resources:
        """What the grid asks of the cluster at once (generation and trials do not overlap)."""
        trials = self.per_trial * self.concurrent
        return Resources(max(trials.cpus, self.generation.cpus), max(trials.gpus, self.generation.gpus))


def make_plan(spec: SweepSpec) -> Plan:
    axes = spec.sweep
    trials = grid_trials(axes)
    res = spec.resources
    worker = Resources(cpus=res.cpus_per_worker, gpus=res.gpus_per_worker)
    per_trial = TRIAL_DRIVER + worker * res.workers_per_trial
    gen = spec.generation
    engine = Resources(cpus=1, gpus=gen.gpus_per_engine)
    return Plan(
        trials=trials,
        per_trial=per_trial,
        concurrent=min(axes.max_concurrent_trials, len(trials)),
        generation=engine * gen.engines,
        output_dir=f"{spec.output.dir.rstrip('/')}/{spec.name}",
    )


class ModelPaths(Section):
    """The trial's models as local folders (hub ids resolved on the driver), and how results name them."""

    student_dir: str = Field(description="The base student, a Hugging Face folder.")
    teacher_dir: str = Field(description="The teacher's folder (the online teacher; its tokenizer).")
    tokenizer_dir: str = Field(description="The tokenizer and chat template the traces were made with.")
    trust_remote_code: bool = Field(False, description="student.trust_remote_code: run the models' own code.")
    teacher_label: str = Field("embedded", description="'org/name@<commit>', a folder, or 'embedded'.")
    student_label: str = Field("embedded", description="'org/name@<commit>', a folder, or 'embedded'.")


class EvalEngine(Section):
    """The one vLLM engine that evaluates a trained student."""

    gpus: int = Field(ge=0, description="GPUs of the engine: 1 where the teacher's engines use GPUs, else 0.")
    resources: dict[str, float] = Field({}, description="generation.engine_resources: the same node type.")


class RunSettings(Section):
    """Settings of the Ray Train run that sweeps keep at these defaults; tests and benchmarks change them."""

    grad_clip: float = Field(1.0, ge=0, description="Gradient-norm clipping (0: none).")
    loss_chunk_size: int = Field(1024, ge=1, description="Positions per vocabulary-projection chunk.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    max_failures: int = Field(2, ge=0, description="Worker failures Ray Train recovers from (checkpoints).")
    keep_checkpoints: int = Field(2, ge=1, description="Ray Train checkpoints kept per trial.")


def trial_dir(output_dir: str, trial_id: str) -> Path:
    """A trial's own folder under the sweep's output folder (`TrialConfig.folder`)."""
    return Path(output_dir) / "trials" / trial_id


class TrialConfig(Section):
    """Everything one trial runs with, built once on the driver from the validated spec (`trial_config`).

    Tune hands its dump to `raykd.trial.run_trial`, which hands it on to each Ray Train worker; both validate
    it once and give every component its section: the loss `training.kd`, DeepSpeed `training`, the
    examples the grid point, evaluation `evaluation` and `eval_engine`.
    """

    fraction: float = Field(gt=0, le=1, description="The grid point: the share of each sequence kept.")
    segments: tuple[str, ...] = Field(description="The grid point: supervised segments, in segment order.")
    seed: int = Field(description="The grid point: the training seed.")
    output_dir: str = Field(description="The sweep's output folder (output.dir/<name>), absolute.")
    traces_path: str = Field(description="The segmented trace folder (Parquet) every trial trains on.")
    eval_problems_path: str = Field(description="The held-out problems, JSONL.")
    eval_sets_path: str | None = Field(
        None, description="The evaluation sets (raykd.evalsets.write_sets_file); None: the held-out problems."
    )
    training: TrainingSpec
    resources: ResourcesSpec
    evaluation: EvaluationSpec
    answer_check: AnswerCheck
    models: ModelPaths
    eval_engine: EvalEngine
    identity: dict[str, Any] = Field({}, description="Fingerprint and settings (raykd.identity).")
    run: RunSettings = Field(default_factory=RunSettings)

    @property
    def trial(self) -> Trial:
        return Trial(self.fraction, self.segments, self.seed)

    @property
    def trial_id(self) -> str:
        return self.trial.trial_id

    @property
    def folder(self) -> Path:
        """The trial's own folder: record, Ray Train checkpoints, the trained student."""
        return trial_dir(self.output_dir, self.trial_id)

    @property
    def student_out(self) -> str:
        return str(self.folder / "student")

    @property
    def tensorboard_dir(self) -> str:
        return str(Path(self.output_dir) / "tensorboard" / self.trial_id)

    @property
    def use_gpu(self) -> bool:
        return self.resources.gpus_per_worker > 0

    @property
    def checkpointing(self) -> bool:
        """Gradient checkpointing as run: 'auto' means on GPUs (activations dominate there), off on CPU."""
        setting = self.training.gradient_checkpointing
        return self.use_gpu if setting == "auto" else bool(setting)

    @property
    def step_sequences(self) -> int:
        """Sequences each worker takes per optimizer step (batch_size is summed over workers)."""
        return self.training.batch_size // self.resources.workers_per_trial


def trial_config(
    spec: SweepSpec,
    plan: Plan,
    trial: Trial,
    models: ModelPaths,
    paths: dict[str, str],
    identity: dict[str, Any] | None = None,
) -> TrialConfig:
    """One trial's config from the validated spec, its grid point and the resolved models.

    paths: 'traces_path', 'eval_problems_path' and, with evaluation sets, 'eval_sets_path'. The student is
    evaluated by one vLLM engine: one GPU where the teacher's engines use GPUs, on the same node type
    (custom resources).
    """
    return TrialConfig(
        fraction=trial.fraction,
        segments=trial.segments,
        seed=trial.seed,
        output_dir=plan.output_dir,
        traces_path=paths["traces_path"],
        eval_problems_path=paths["eval_problems_path"],
        eval_sets_path=paths.get("eval_sets_path"),
        training=spec.training,
        resources=spec.resources,
        evaluation=spec.evaluation,
        answer_check=spec.problems.answer_check,
        models=models,
        eval_engine=EvalEngine(
            gpus=min(1, spec.generation.gpus_per_engine), resources=spec.generation.engine_resources
        ),
        identity=identity or {},
    )


# Assumptions of the GPU-hour estimate. They are rough, stated, and printed with the estimate: replace them
# with your own measurements (benchmarks/ measures tokens/s) before budgeting a real run.
ASSUMED = {
    "completion_fill": 0.6,  # mean teacher completion as a share of generation.max_tokens
    "eval_completion_fill": 0.5,  # mean student completion as a share of evaluation.max_tokens
    "prompt_tokens": 200,  # mean chat-formatted prompt length
    "kept_share": 0.7,  # share of traces that survive filter: keep_correct
    "gen_tokens_per_s_per_gpu": 2000.0,  # vLLM decode, 8B teacher, batched
    "train_tokens_per_s_per_gpu": 8000.0,  # DeepSpeed, ~2B student, bf16
    "eval_tokens_per_s_per_gpu": 6000.0,  # vLLM decode, student
    "startup_h_per_job": 5 / 60,  # model load, engine or trainer start
}


def gpu_hours(spec: SweepSpec, plan: Plan, sets: list[EvalSet] | None = None) -> dict[str, float]:
    """A rough GPU-hour bill: generation + training (which scales with the sum of fractions) + evaluation
    of every trial on every set (``sets`` as read, else as the spec says: raykd.evalsets.planned_sets) +
    the references (teacher and base student, once per sweep, on every set)."""
    a, gen, p = ASSUMED, spec.generation, spec.problems
    completion = a["completion_fill"] * gen.max_tokens
    gen_gpus = gen.engines * gen.gpus_per_engine
    gen_h = p.train_size * gen.samples_per_prompt * completion / 3600 / a["gen_tokens_per_s_per_gpu"]
    gen_h += gen_gpus * a["startup_h_per_job"]
    train_gpus = spec.resources.workers_per_trial * spec.resources.gpus_per_worker
    seq_tokens = a["kept_share"] * p.train_size * gen.samples_per_prompt * (a["prompt_tokens"] + completion)
    sum_f = sum(t.fraction for t in plan.trials)
    train_h = sum_f * spec.training.epochs * seq_tokens / 3600 / a["train_tokens_per_s_per_gpu"]
    train_h += len(plan.trials) * train_gpus * a["startup_h_per_job"]
    trials_h, refs_h = 0.0, 2 * a["startup_h_per_job"]  # the references' two engines, one per model
    for eval_set in planned_sets(spec, sets):
        on_trials, on_refs = set_gpu_hours(spec, plan, eval_set)
        trials_h, refs_h = trials_h + on_trials, refs_h + on_refs
    if not gen_gpus:
        gen_h = refs_h = 0.0
    if not train_gpus:
        train_h = trials_h = 0.0
    return {"generation": gen_h, "training": train_h, "evaluation": trials_h, "references": refs_h}


def set_gpu_hours(spec: SweepSpec, plan: Plan, eval_set: EvalSet) -> tuple[float, float]:
    """(every trial, the two references) GPU-hours of evaluating one set: ρe of its most tokens per model
    (problems x samples x max_tokens), at the student's rate for each trial and the base student, at the
    teacher's generation rate for the teacher (engine starts not included)."""
    a = ASSUMED
    tokens = a["eval_completion_fill"] * eval_set.max_completion_tokens  # per evaluated model (ρe·n·k·Te)
    trials = len(plan.trials) * tokens / 3600 / a["eval_tokens_per_s_per_gpu"]
    student = tokens / 3600 / a["eval_tokens_per_s_per_gpu"]
    teacher = tokens / 3600 / a["gen_tokens_per_s_per_gpu"]
    return trials, student + teacher


def describe_set_costs(spec: SweepSpec, plan: Plan, sets: list[EvalSet] | None = None) -> list[str]:
    """One line per evaluation set: its most tokens per model and its GPU-hours (`set_gpu_hours`)."""
    lines = []
    for s in planned_sets(spec, sets):
        on_trials, on_refs = set_gpu_hours(spec, plan, s)
        n = "? (size unknown)" if s.n_problems is None else f"{s.n_problems}"
        lines.append(
            f"  evaluation on '{s.name}': {n} problems x {s.samples} samples x {s.max_tokens:,} max tokens = "
            f"{s.max_completion_tokens:,} tokens at most per model; {on_trials:.1f} GPU-hours over "
            f"{len(plan.trials)} trials + {on_refs:.1f} for the references"
        )
    return lines


def describe_plan(spec: SweepSpec, plan: Plan, sets: list[EvalSet] | None = None) -> str:
    """The dry-run text: what would run, with what, and where results go (``sets``: as `gpu_hours`)."""
    kd, gen, res = spec.training.kd, spec.generation, spec.resources
    lines = [
        f"sweep '{spec.name}': {len(plan.trials)} trials "
        f"(truncation {len(spec.sweep.truncation)} x segments {len(spec.sweep.segments)} "
        f"x seeds {len(spec.sweep.seeds)}), policy {spec.training.truncation_policy}, "
        f"KD {kd.divergence} λ={kd.kd_weight:g} ({kd.teacher_signal})",
        f"teacher: {spec.teacher.model}   student: {spec.student.model}",
        f"generation: {gen.engines} vLLM engine(s) x {gen.gpus_per_engine} GPU "
        f"(tp={gen.tensor_parallel}) -> {plan.generation}",
        f"per trial: {res.workers_per_trial} DeepSpeed worker(s) (ZeRO-{spec.training.zero_stage}) "
        f"+ trial driver -> {plan.per_trial}",
        f"at most {plan.concurrent} trial(s) at once -> peak {plan.peak}",
        "",
        f"{'#':>3}  {'trial':<24} {'fraction':>8}  {'segments':<10} {'seed':>4}",
    ]
    for i, t in enumerate(plan.trials):
        lines.append(
            f"{i:>3}  {t.trial_id:<24} {fraction_label(t.fraction):>8}  {t.segments_label:<10} {t.seed:>4}"
        )
    cost = gpu_hours(spec, plan, sets)
    if sum(cost.values()) > 0:
        lines += [
            "",
            f"estimated GPU-hours: {sum(cost.values()):.0f} (generation {cost['generation']:.0f}, training "
            f"{cost['training']:.0f}, evaluation {cost['evaluation']:.0f}, references "
            f"{cost['references']:.0f}); a rough guess from assumed rates (raykd.plan.ASSUMED): measure "
            "yours with benchmarks/",
            *describe_set_costs(spec, plan, sets),
        ]
    lines += [
        "",
        f"outputs: {plan.output_dir}/ (results.csv, results.md, frontier.png, trials/<trial>/)",
        f"traces:  {spec.output.dir.rstrip('/')}/traces/<content hash>/ (shared by every trial and sweep)",
    ]
    return "\n".join(lines)
