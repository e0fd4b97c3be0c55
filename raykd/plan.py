"""The plan of a sweep: the grid of trials and the resources they ask Ray for. Pure Python, no Ray."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from raykd.spec import SEGMENT_SHORT, SweepSpec


@dataclass(frozen=True)
class Trial:
    """One point of the grid."""

    fraction: float
    segments: tuple[str, ...]
    seed: int

    @property
    def segments_label(self) -> str:
        """The paper's notation: 'P+CoT+A'."""
        return "+".join(SEGMENT_SHORT[s] for s in self.segments)

    @property
    def trial_id(self) -> str:
        """A stable, filesystem-safe name, e.g. 'f0.50_P+CoT+A_s0'."""
        return f"f{self.fraction:.2f}_{self.segments_label}_s{self.seed}"


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


# The Tune trial itself (a function trainable that drives a TorchTrainer) holds one CPU.
TRIAL_DRIVER = Resources(cpus=1, gpus=0)


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
    trials = [
        Trial(fraction=f, segments=tuple(seg), seed=seed)
        for seed, seg, f in itertools.product(axes.seeds, axes.segments, sorted(axes.truncation))
    ]
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


def describe_plan(spec: SweepSpec, plan: Plan) -> str:
    """The dry-run text: what would run, with what, and where results go."""
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
        lines.append(f"{i:>3}  {t.trial_id:<24} {t.fraction:>8.2f}  {t.segments_label:<10} {t.seed:>4}")
    lines += [
        "",
        f"outputs: {plan.output_dir}/ (results.csv, results.md, frontier.png, trials/<trial>/)",
        f"traces:  {spec.output.dir.rstrip('/')}/traces/<content hash>/ (shared by every trial and sweep)",
    ]
    return "\n".join(lines)
