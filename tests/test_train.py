"""KD training: the step on a real DeepSpeed engine (no Ray), then the Ray Train run on 2 gloo workers.

The slow tests run the real stack (local Ray, Train V2, DeepSpeed ZeRO on gloo) on a tiny random Llama and
synthetic traces in the agreed schema, and check what a user looks at: losses, checkpoints, the Hugging Face
student. A worker killed mid-run and the resume: tests/test_resume.py (the same weights as an uninterrupted
run) and tests/test_faults.py (through the sweep command).
"""

from __future__ import annotations

import copy
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from raykd.kd import batching, step, synthetic
from raykd.kd.deepspeed_config import build_engine, ds_config, init_single_process
from raykd.kd.examples import Example, TrialData, prepare_examples, sort_by_key
from raykd.kd.losses import token_losses
from raykd.kd.memory import PeakMemory
from raykd.kd.model import KDStudent, ModelShape, OnlineTeacher, check_vocab, enable_checkpointing
from raykd.kd.teachers import TopKTeacher
from raykd.plan import ModelPaths, RunSettings, TrialConfig, make_plan, trial_config
from raykd.spec import KDSpec, LossSpec, ResourcesSpec, SpecError, TrainingSpec, parse_spec

CPU = torch.device("cpu")
VOCAB, K = 96, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed() -> None:
    init_single_process("gloo", _free_port())


def _examples(n: int = 6, prompt_logprobs: bool = True, **trial) -> list[Example]:
    rows = synthetic.synthetic_rows(n, vocab=VOCAB, k=K, seed=5, prompt_logprobs=prompt_logprobs)
    examples, _ = prepare_examples(rows, TrialData(**trial))
    return sort_by_key(examples)


def _engine(model: torch.nn.Module, micro: int, accumulation: int, zero: int = 1) -> object:
    training = TrainingSpec(batch_size=micro * accumulation, micro_batch_size=micro, zero_stage=zero, lr=1e-2)
    return build_engine(copy.deepcopy(model), LossSpec(), ds_config(training, world_size=1, bf16=False))


def _params(engine: object) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in engine.module.parameters()])  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ no Ray


@pytest.mark.parametrize("prompt_logprobs", [True, False])
def test_student_loss_matches_full_logits_reference(prompt_logprobs: bool):
    """Hidden states at flat positions + the chunked loss == HF's own logits at those positions."""
    model = synthetic.tiny_llama(VOCAB, hidden=64, heads=2)
    examples = _examples(prompt_logprobs=prompt_logprobs, fraction=0.7)
    mb = batching.collate(examples[:3], K)
    cfg = LossSpec()
    out = KDStudent(model, cfg, chunk_size=7)(**step.to_device(mb, CPU))
    logits = model(torch.from_numpy(mb.input_ids)).logits.reshape(-1, VOCAB)[torch.from_numpy(mb.flat_pos)]
    teacher = TopKTeacher(torch.from_numpy(mb.topk_ids), torch.from_numpy(mb.topk_logprobs))
    ref = token_losses(logits, torch.from_numpy(mb.target_ids), teacher, cfg)
    has = torch.from_numpy(mb.has_teacher)
    want = (0.5 * ref.ce + 0.5 * ref.kd)[has].sum() + 0.5 * ref.ce[~has].sum()
    assert has.all() == prompt_logprobs
    torch.testing.assert_close(out[0], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], ref.ce.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2], ref.kd[has].sum(), rtol=1e-5, atol=1e-5)
    assert float(out[4]) == float(has.sum())
    assert out[7].tolist() == np.bincount(mb.segment, minlength=3).tolist()


def _sgd_engine(model: torch.nn.Module, micro: int, accumulation: int, checkpointing: bool = False) -> object:
    """An engine whose step is p -= grad (SGD, lr 1, no clipping): its weight change is the gradient."""
    import deepspeed

    training = TrainingSpec(batch_size=micro * accumulation, micro_batch_size=micro, zero_stage=0, lr=1.0)
    config = ds_config(training, world_size=1, bf16=False, grad_clip=0.0)
    del config["optimizer"]
    model = copy.deepcopy(model)
    if checkpointing:
        enable_checkpointing(model)
    module = KDStudent(model, LossSpec())
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=torch.optim.SGD(module.parameters(), lr=1.0), config=config
    )
    return engine


def test_gradient_weighs_every_token_of_the_step_equally(distributed: None):
    """Gradient = d(sum of token losses of the step) / (its supervised tokens), however it is split into
    micro-batches; a dummy micro-batch adds nothing."""
    model = synthetic.tiny_llama(VOCAB, hidden=64, heads=2)
    examples = _examples(fraction=0.5)
    shape = ModelShape.of(model)
    a, b = examples[0], examples[3]  # different lengths and target counts
    assert len(a.target_ids) != len(b.target_ids)
    reference = KDStudent(copy.deepcopy(model), LossSpec())
    n = len(a.target_ids) + len(b.target_ids)
    loss = sum(reference(**step.to_device(batching.collate([e], K), CPU))[0] for e in (a, b)) / n
    loss.backward()
    want = torch.cat([p.grad.flatten() for p in reference.parameters()])
    base = _params(_sgd_engine(model, 1, 1))
    for micro, micros in [(1, [[a], [b]]), (2, [[a, b]]), (2, [[], [a, b]])]:
        engine = _sgd_engine(model, micro, len(micros))
        sums = step.train_step(engine, [batching.collate(m, K) for m in micros], CPU, shape)
        torch.testing.assert_close(base - _params(engine), want, rtol=1e-4, atol=1e-7)
        assert sums["tokens"] == sums["step_tokens"] == n


def _reference_gradient(model: torch.nn.Module, examples: list[Example]) -> torch.Tensor:
    reference = KDStudent(copy.deepcopy(model), LossSpec())
    n = sum(len(e.target_ids) for e in examples)
    loss = sum(reference(**step.to_device(batching.collate([e], K), CPU))[0] for e in examples) / n
    loss.backward()
    return torch.cat([p.grad.flatten() for p in reference.parameters()])


def test_a_step_applies_one_update_however_many_micro_batches_it_holds(distributed: None):
    """Token-bounded steps hold varying numbers of micro-batches: still one update with the step's gradient,
    whatever the engine's configured accumulation count, step after step."""
    model = synthetic.tiny_llama(VOCAB, hidden=64, heads=2)
    examples = _examples(fraction=0.5)
    shape = ModelShape.of(model)
    engine = _sgd_engine(model, 1, 2)  # configured for 2 micro-batches per step
    before = _params(engine).clone()
    first, second = examples[:3], examples[3:5]
    step.train_step(engine, [batching.collate([e], K) for e in first], CPU, shape)  # 3 micro-batches
    torch.testing.assert_close(
        before - _params(engine), _reference_gradient(model, first), rtol=1e-4, atol=1e-7
    )
    moved = copy.deepcopy(engine.module.model)  # type: ignore[attr-defined]
    mid = _params(engine).clone()
    step.train_step(engine, [batching.collate(second, K)], CPU, shape)  # 1 micro-batch
    torch.testing.assert_close(
        mid - _params(engine), _reference_gradient(moved, second), rtol=1e-4, atol=1e-7
    )


def test_gradient_checkpointing_changes_no_loss_and_no_gradient(distributed: None):
    model = synthetic.tiny_llama(VOCAB, hidden=64, heads=2, layers=3)
    examples = _examples(fraction=1.0)[:4]
    shape = ModelShape.of(model)
    results = []
    for checkpointing in (False, True):
        engine = _sgd_engine(model, 2, 2, checkpointing=checkpointing)
        assert engine.module.model.is_gradient_checkpointing == checkpointing  # type: ignore[attr-defined]
        before = _params(engine).clone()
        micros = [batching.collate(examples[:2], K), batching.collate(examples[2:], K)]
        sums = step.train_step(engine, micros, CPU, shape)
        results.append((sums["loss_sum"], before - _params(engine)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="gradient_checkpointing: false"):
        enable_checkpointing(torch.nn.Linear(2, 2))


def test_step_without_supervised_tokens_changes_nothing(distributed: None):
    model = synthetic.tiny_llama(VOCAB, hidden=64, heads=2)
    engine = _engine(model, micro=1, accumulation=2)
    before = _params(engine).clone()
    sums = step.train_step(engine, [batching.collate([], K)] * 2, CPU, ModelShape.of(model))
    assert sums["step_tokens"] == 0 and all(np.isfinite(v) for v in sums.values())
    assert torch.equal(_params(engine), before)


@pytest.mark.parametrize("cached_topk", [True, False])
def test_online_teacher_step(distributed: None, cached_topk: bool):
    student = synthetic.tiny_llama(VOCAB, hidden=64, heads=2)
    teacher = OnlineTeacher(synthetic.tiny_llama(VOCAB, hidden=128, heads=4, layers=3, seed=1))
    engine = _engine(student, micro=2, accumulation=1)
    t_shape = ModelShape.of(teacher.model)
    rows = synthetic.synthetic_rows(4, vocab=VOCAB, k=K, seed=5)
    if not cached_topk:  # traces that came without logprobs: the online teacher is the only KD signal
        for name in ("k", "topk_ids", "topk_logprobs", "prompt_topk_ids", "prompt_topk_logprobs"):
            del rows[name]
    examples, _ = prepare_examples(rows, TrialData(fraction=0.5))
    mb = batching.collate(examples[:2], K if cached_topk else 0)
    sums = step.train_step(engine, [mb], CPU, ModelShape.of(student), teacher, t_shape)
    assert np.isfinite(sums["kd_sum"]) and sums["kd_sum"] > 0
    assert sums["topk_mass_sum"] == pytest.approx(sums["tokens"])  # a full-vocabulary teacher covers all mass
    s_shape = ModelShape.of(student)
    args = (mb.forward_tokens, mb.n_targets, mb.sq_len_sum)
    assert sums["flops"] == pytest.approx(3 * s_shape.forward_flops(*args) + t_shape.forward_flops(*args))


def test_flops_formula_counts_the_body_the_supervised_head_and_causal_attention():
    h, inter, layers, vocab = 64, 128, 2, VOCAB
    shape = ModelShape.of(synthetic.tiny_llama(vocab, hidden=h, heads=2, layers=layers))
    # per layer: q, k, v, o (h x h), gate, up, down (h x inter), two RMSNorm weights; then the final norm
    assert shape.body_params == layers * (4 * h * h + 3 * h * inter + 2 * h) + h
    assert (shape.vocab, shape.hidden, shape.layers, shape.attn_dim) == (vocab, h, layers, h)
    assert shape.forward_flops(10, 4, 10 * 11) == 2 * (
        shape.body_params * 10 + vocab * h * 4 + layers * h * 110
    )


def test_vocabulary_mismatch_and_batch_split_are_errors_before_training(tmp_path: Path):
    """A pair whose vocabularies differ is refused on the driver before any trace is generated, a batch size
    that does not split over the workers by the spec (its --dry-run too), the traces' own ids in the worker
    before the first step."""
    from raykd.embedded.tokenizer import build_tokenizer
    from raykd.traces.checks import check_vocabulary

    build_tokenizer(tmp_path / "tokenizer")
    synthetic.tiny_llama(VOCAB, hidden=64, heads=2).save_pretrained(tmp_path / "student")
    synthetic.tiny_llama(VOCAB + 32, hidden=64, heads=2).save_pretrained(tmp_path / "teacher")
    # the tokenizer's ids need more rows than the student's 96
    with pytest.raises(ValueError, match="emits ids up to"):
        check_vocabulary(str(tmp_path / "teacher"), str(tmp_path / "student"), str(tmp_path / "tokenizer"))
    with pytest.raises(
        SpecError, match=r"training.batch_size: 6 is not a multiple of training.micro_batch_size"
    ):
        _train_cfg(tmp_path, teacher_signal="online", batch_size=6)
    with pytest.raises(ValueError, match=r"another vocabulary"):
        check_vocab(synthetic.tiny_llama(VOCAB, hidden=64, heads=2), max_token_id=VOCAB)


def test_peak_memory_sees_a_temporary_allocation():
    memory = PeakMemory(CPU, interval=0.001)
    memory.reset()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    time.sleep(0.05)
    del block
    time.sleep(0.01)
    assert memory.above_baseline() >= 48 * 2**20
    memory.close()


# ------------------------------------------------------------------------------------------ Ray Train


SECTIONS = {
    "training": set(TrainingSpec.model_fields) - {"kd"},
    "kd": set(KDSpec.model_fields),
    "resources": set(ResourcesSpec.model_fields),
    "models": set(ModelPaths.model_fields),
    "run": set(RunSettings.model_fields),
    "point": {"fraction", "segments", "seed"},
}


def _train_cfg(root: Path, name: str = "t", traces: Path | None = None, **over) -> TrialConfig:
    """A trial's config as a sweep builds it (spec -> plan -> trial_config), with these settings; results go
    under root/name/trials/<trial id>/."""
    parts: dict[str, dict] = {
        "training": dict(
            epochs=2, lr=1e-3, batch_size=8, micro_batch_size=2, checkpoint_every=2, log_every=1
        ),
        "kd": {},
        "resources": dict(workers_per_trial=2, gpus_per_worker=0, cpus_per_worker=1),
        "models": dict(
            student_dir=str(root / "student"),
            teacher_dir=str(root / "student"),
            tokenizer_dir=str(root / "tokenizer"),
        ),
        "run": dict(keep_checkpoints=10, max_failures=1),
        "point": dict(fraction=0.5, segments=["cot", "answer"], seed=0),
    }
    for key, value in over.items():
        section = next(name for name, keys in SECTIONS.items() if key in keys)
        parts[section][key] = value
    point = parts["point"]
    spec = parse_spec(
        {
            "name": name,
            "teacher": {"model": "embedded"},
            "student": {"model": "embedded"},
            "training": {**parts["training"], "kd": parts["kd"]},
            "resources": parts["resources"],
            "sweep": {
                "truncation": [point["fraction"]],
                "segments": [point["segments"]],
                "seeds": [point["seed"]],
            },
            "output": {"dir": str(root)},
        }
    )
    plan = make_plan(spec)
    paths = {"traces_path": str(traces or root / "traces"), "eval_problems_path": str(root / "eval.jsonl")}
    cfg = trial_config(spec, plan, plan.trials[0], ModelPaths(**parts["models"]), paths)
    return cfg.model_copy(update={"run": RunSettings(**parts["run"])})


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def kd_inputs(root: Path) -> Path:
    """A trial's inputs under ``root``: the embedded tokenizer, a tiny Llama student, 32 synthetic traces."""
    from transformers import AutoTokenizer

    from raykd.embedded.tokenizer import build_tokenizer

    build_tokenizer(root / "tokenizer")
    vocab = len(AutoTokenizer.from_pretrained(root / "tokenizer"))
    synthetic.tiny_llama(vocab).save_pretrained(root / "student")
    synthetic.write_traces(synthetic.synthetic_rows(32, vocab=vocab, k=K, seed=1), root / "traces", files=4)
    return root


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kd_inputs(tmp_path_factory.mktemp("kd"))


def _fit(ray, root: Path, name: str, traces: Path | None = None, **over) -> object:
    from raykd.kd.trainer import build_trainer

    cfg = _train_cfg(root, name, traces, **over)
    return build_trainer(cfg, {"train": ray.data.read_parquet(cfg.traces_path)}).fit()


def _read_rows(folder: Path) -> dict:
    import pyarrow.parquet as pq

    return pq.read_table(folder).to_pydict()


@pytest.fixture(scope="module")
def zero2_run(ray_local, run_root: Path) -> object:
    """ZeRO-2, 2 workers, 8 steps, a checkpoint every 2 (a worker killed mid-run: tests/test_resume.py)."""
    return _fit(ray_local, run_root, "zero2")


@pytest.mark.slow
def test_two_workers_train_checkpoint_and_export_the_student(zero2_run, run_root: Path):
    from transformers import AutoModelForCausalLM

    m = zero2_run.metrics
    assert m["resumed_from_step"] == -1 and m["step"] == 8  # 32 traces / 8 per step x 2 epochs
    assert m["sequences"] == 64 and m["traces"] == 32 and m["traces_unsupervised"] == 0
    checkpoints = sorted((c.path, c_m) for c, c_m in zero2_run.best_checkpoints)
    steps = [c_m["step"] for _, c_m in checkpoints]
    assert steps[:3] == [2, 4, 6]
    assert (Path(checkpoints[0][0]) / "state.json").is_file() and (
        Path(checkpoints[0][0]) / "latest"
    ).is_file()
    first, last = checkpoints[0][1], checkpoints[2][1]
    assert last["loss"] < first["loss"] - 0.1 and last["ce"] < first["ce"]
    assert np.isfinite(m["loss"]) and m["kd"] > 0 and 0.8 < m["topk_mass"] < 1
    assert m["tokens_cot"] > 0 and m["tokens_prompt"] == 0  # the [cot, answer] mask
    for key in ("supervised_tokens", "kept_tokens", "tokens_per_s", "flops", "peak_mem_bytes", "wall_s"):
        assert m[key] > 0, key
    # counts are exact totals over both epochs: what the data says, twice
    _, stats = prepare_examples(_read_rows(run_root / "traces"), TrialData(0.5, segments=("cot", "answer")))
    assert (m["kept_tokens"], m["supervised_tokens"]) == (2 * stats.kept_tokens, 2 * stats.supervised_tokens)
    student = Path(m["student_dir"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in student.iterdir()
    }
    trained = AutoModelForCausalLM.from_pretrained(student)
    base = AutoModelForCausalLM.from_pretrained(run_root / "student")
    assert trained.config.vocab_size == base.config.vocab_size
    assert not torch.equal(trained.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert list((run_root / "zero2" / "tensorboard").glob("*/events.out.tfevents.*"))  # rank 0's log


@pytest.mark.slow
def test_zero3_run_matches_the_zero2_run(zero2_run, ray_local, run_root: Path):
    """ZeRO-3 (weights partitioned from loading on, gathered for the export) trains the same student."""
    from safetensors.torch import load_file

    result = _fit(ray_local, run_root, "zero3", zero_stage=3)
    assert result.metrics["resumed_from_step"] == -1 and result.metrics["step"] == 8
    a = load_file(Path(zero2_run.metrics["student_dir"]) / "model.safetensors")
    b = load_file(Path(result.metrics["student_dir"]) / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert result.metrics["loss"] == pytest.approx(zero2_run.metrics["loss"], rel=1e-4)


@pytest.mark.slow
def test_an_empty_shard_runs_dummies_and_never_nans(ray_local, run_root: Path):
    # two traces, one per worker (Ray splits rows evenly); supervising the answer at f = 0.5, the trace with a
    # long chain of thought keeps no answer token, so its worker has nothing to train on
    short = synthetic.synthetic_rows(1, vocab=96, k=K, seed=2, cot_len=(2, 2), answer_len=(20, 20))
    long = synthetic.synthetic_rows(1, vocab=96, k=K, seed=3, cot_len=(60, 60), answer_len=(3, 3))
    rows = {name: short[name] + long[name] for name in short}
    rows["problem_id"] = ["short", "long"]
    traces = synthetic.write_traces(rows, run_root / "traces_empty", files=2)
    result = _fit(ray_local, run_root, "empty", traces=traces, segments=["answer"], epochs=1, batch_size=4)
    m = result.metrics
    assert m["traces"] == 2 and m["traces_unsupervised"] == 1 and m["traces_trained"] == 1
    assert m["step"] == 1 and m["dummy_micro_batches"] == 1  # the empty worker's one micro-batch
    assert np.isfinite(m["loss"]) and m["supervised_tokens"] > 0 and m["tokens_answer"] > 0
    assert json.loads((Path(result.checkpoint.path) / "state.json").read_text())["done"]


@pytest.mark.slow
def test_token_budget_trains_long_traces_whole_and_alone(ray_local, run_root: Path):
    """micro_batch_tokens below some traces' length: they train whole, each in a pass of its own, and are
    counted; every other pass stays within the budget. Two workers, gradient checkpointing forced on."""
    rows = synthetic.synthetic_rows(12, vocab=96, k=K, seed=7, cot_len=(10, 200))
    traces = synthetic.write_traces(rows, run_root / "traces_budget", files=2)
    budget = 120
    examples, _ = prepare_examples(rows, TrialData(1.0))
    lengths = batching.example_lengths(examples)
    assert 0 < int((lengths > budget).sum()) < len(lengths)
    result = _fit(
        ray_local,
        run_root,
        "budget",
        traces=traces,
        fraction=1.0,
        segments=["prompt", "cot", "answer"],
        epochs=1,
        batch_size=6,
        micro_batch_size=3,
        micro_batch_tokens=budget,
        gradient_checkpointing=True,
    )
    m = result.metrics
    assert m["oversized_sequences"] == int((lengths > budget).sum())
    assert m["sequences"] == 12 and m["forward_tokens"] == int(lengths.sum())  # every token, none cut
    assert 0 < m["max_pass_tokens"] <= budget  # what sets the activation peak of the other passes
    assert m["gradient_checkpointing"] == 1 and np.isfinite(m["loss"]) and m["step"] == 2
