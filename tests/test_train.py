"""KD training: the step on a real DeepSpeed engine (no Ray), then the Ray Train run on 2 gloo workers.

The slow tests run the real stack (local Ray, Train V2, DeepSpeed ZeRO on gloo) on a tiny random Llama and
synthetic traces in the agreed schema, and check what a user looks at: losses, checkpoints, a resume after a
worker dies, the Hugging Face student.
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
from raykd.kd.batching import TrialData
from raykd.kd.losses import KDLossConfig, TopKTeacher, token_losses

CPU = torch.device("cpu")
VOCAB, K = 96, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed() -> None:
    step.init_single_process("gloo", _free_port())


def _examples(n: int = 6, prompt_logprobs: bool = True, **trial) -> list[batching.Example]:
    rows = synthetic.synthetic_rows(n, vocab=VOCAB, k=K, seed=5, prompt_logprobs=prompt_logprobs)
    examples, _ = batching.prepare_examples(rows, TrialData(**trial))
    return batching.sort_by_key(examples)


def _engine(model: torch.nn.Module, micro: int, accumulation: int, zero: int = 1) -> object:
    config = step.ds_config(
        batch_size=micro * accumulation,
        micro_batch_size=micro,
        world_size=1,
        zero_stage=zero,
        lr=1e-2,
        weight_decay=0.0,
        bf16=False,
    )
    return step.build_engine(copy.deepcopy(model), KDLossConfig(), config)


def _params(engine: object) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in engine.module.parameters()])  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ no Ray


@pytest.mark.parametrize("prompt_logprobs", [True, False])
def test_student_loss_matches_full_logits_reference(prompt_logprobs: bool):
    """Hidden states at flat positions + the chunked loss == HF's own logits at those positions."""
    model = synthetic.tiny_llama(VOCAB, hidden=64, heads=2)
    examples = _examples(prompt_logprobs=prompt_logprobs, fraction=0.7)
    mb = batching.collate(examples[:3], K)
    cfg = KDLossConfig(chunk_size=7)
    out = step.KDStudent(model, cfg)(**step.to_device(mb, CPU))
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

    config = step.ds_config(
        batch_size=micro * accumulation,
        micro_batch_size=micro,
        world_size=1,
        zero_stage=0,
        lr=1.0,
        weight_decay=0.0,
        bf16=False,
        grad_clip=0.0,
    )
    del config["optimizer"]
    model = copy.deepcopy(model)
    if checkpointing:
        step.enable_checkpointing(model)
    module = step.KDStudent(model, KDLossConfig())
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=torch.optim.SGD(module.parameters(), lr=1.0), config=config
    )
    return engine


def test_gradient_weighs_every_token_of_the_step_equally(distributed: None):
    """Gradient = d(sum of token losses of the step) / (its supervised tokens), however it is split into
    micro-batches; a dummy micro-batch adds nothing."""
    model = synthetic.tiny_llama(VOCAB, hidden=64, heads=2)
    examples = _examples(fraction=0.5)
    shape = step.ModelShape.of(model)
    a, b = examples[0], examples[3]  # different lengths and target counts
    assert len(a.target_ids) != len(b.target_ids)
    reference = step.KDStudent(copy.deepcopy(model), KDLossConfig())
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


def _reference_gradient(model: torch.nn.Module, examples: list[batching.Example]) -> torch.Tensor:
    reference = step.KDStudent(copy.deepcopy(model), KDLossConfig())
    n = sum(len(e.target_ids) for e in examples)
    loss = sum(reference(**step.to_device(batching.collate([e], K), CPU))[0] for e in examples) / n
    loss.backward()
    return torch.cat([p.grad.flatten() for p in reference.parameters()])


def test_a_step_applies_one_update_however_many_micro_batches_it_holds(distributed: None):
    """Token-bounded steps hold varying numbers of micro-batches: still one update with the step's gradient,
    whatever the engine's configured accumulation count, step after step."""
    model = synthetic.tiny_llama(VOCAB, hidden=64, heads=2)
    examples = _examples(fraction=0.5)
    shape = step.ModelShape.of(model)
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
    shape = step.ModelShape.of(model)
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
        step.enable_checkpointing(torch.nn.Linear(2, 2))


def test_step_without_supervised_tokens_changes_nothing(distributed: None):
    model = synthetic.tiny_llama(VOCAB, hidden=64, heads=2)
    engine = _engine(model, micro=1, accumulation=2)
    before = _params(engine).clone()
    sums = step.train_step(engine, [batching.collate([], K)] * 2, CPU, step.ModelShape.of(model))
    assert sums["step_tokens"] == 0 and all(np.isfinite(v) for v in sums.values())
    assert torch.equal(_params(engine), before)


@pytest.mark.parametrize("cached_topk", [True, False])
def test_online_teacher_step(distributed: None, cached_topk: bool):
    student = synthetic.tiny_llama(VOCAB, hidden=64, heads=2)
    teacher = step.OnlineTeacher(synthetic.tiny_llama(VOCAB, hidden=128, heads=4, layers=3, seed=1))
    engine = _engine(student, micro=2, accumulation=1)
    t_shape = step.ModelShape.of(teacher.model)
    rows = synthetic.synthetic_rows(4, vocab=VOCAB, k=K, seed=5)
    if not cached_topk:  # traces that came without logprobs: the online teacher is the only KD signal
        for name in ("k", "topk_ids", "topk_logprobs", "prompt_topk_ids", "prompt_topk_logprobs"):
            del rows[name]
    examples, _ = batching.prepare_examples(rows, TrialData(fraction=0.5))
    mb = batching.collate(examples[:2], K if cached_topk else 0)
    sums = step.train_step(engine, [mb], CPU, step.ModelShape.of(student), teacher, t_shape)
    assert np.isfinite(sums["kd_sum"]) and sums["kd_sum"] > 0
    assert sums["topk_mass_sum"] == pytest.approx(sums["tokens"])  # a full-vocabulary teacher covers all mass
    s_shape = step.ModelShape.of(student)
    args = (mb.forward_tokens, mb.n_targets, mb.sq_len_sum)
    assert sums["flops"] == pytest.approx(3 * s_shape.forward_flops(*args) + t_shape.forward_flops(*args))


def test_flops_formula_counts_the_body_the_supervised_head_and_causal_attention():
    h, inter, layers, vocab = 64, 128, 2, VOCAB
    shape = step.ModelShape.of(synthetic.tiny_llama(vocab, hidden=h, heads=2, layers=layers))
    # per layer: q, k, v, o (h x h), gate, up, down (h x inter), two RMSNorm weights; then the final norm
    assert shape.body_params == layers * (4 * h * h + 3 * h * inter + 2 * h) + h
    assert (shape.vocab, shape.hidden, shape.layers, shape.attn_dim) == (vocab, h, layers, h)
    assert shape.forward_flops(10, 4, 10 * 11) == 2 * (
        shape.body_params * 10 + vocab * h * 4 + layers * h * 110
    )


def test_vocabulary_mismatch_is_an_error_before_training(tmp_path: Path):
    from raykd.embedded.tokenizer import build_tokenizer
    from raykd.kd.trainer import build_trainer

    build_tokenizer(tmp_path / "tokenizer")
    synthetic.tiny_llama(VOCAB, hidden=64, heads=2).save_pretrained(tmp_path / "student")
    synthetic.tiny_llama(VOCAB + 32, hidden=64, heads=2).save_pretrained(tmp_path / "teacher")
    cfg = _train_cfg(tmp_path, teacher_dir=str(tmp_path / "teacher"), teacher_signal="online", batch_size=6)
    with pytest.raises(ValueError) as err:
        build_trainer(cfg, {}, str(tmp_path / "runs"), "t")
    # every problem at once: the vocabularies (the tokenizer's ids need more rows than the student's 96)
    # and the batch size
    assert "emits ids up to" in str(err.value) and "not a multiple of micro_batch_size" in str(err.value)
    with pytest.raises(ValueError, match=r"another vocabulary"):
        step.check_vocab(synthetic.tiny_llama(VOCAB, hidden=64, heads=2), max_topk_id=VOCAB)


def test_peak_memory_sees_a_temporary_allocation():
    memory = step.PeakMemory(CPU, interval=0.001)
    memory.reset()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    time.sleep(0.05)
    del block
    time.sleep(0.01)
    assert memory.above_baseline() >= 48 * 2**20
    memory.close()


# ------------------------------------------------------------------------------------------ Ray Train


def _train_cfg(root: Path, **over) -> dict:
    cfg = dict(
        student_dir=str(root / "student"),
        student_out=str(root / "out" / "student"),
        tokenizer_dir=str(root / "tokenizer"),
        fraction=0.5,
        segments=["cot", "answer"],
        seed=0,
        policy="lead_span",
        truncation_policy="lead_span",
        epochs=2,
        lr=1e-3,
        weight_decay=0.0,
        batch_size=8,
        micro_batch_size=2,
        zero_stage=2,
        random_label_mask=0.0,
        checkpoint_every=2,
        log_every=1,
        divergence="forward_kl",
        kd_weight=0.5,
        temperature=1.0,
        jsd_beta=0.5,
        skew_alpha=0.1,
        teacher_signal="cached_topk",
        teacher_dir=None,
        trust_remote_code=False,
        workers_per_trial=2,
        gpus_per_worker=0,
        cpus_per_worker=1,
        keep_checkpoints=10,
        max_failures=1,
    )
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    from raykd.embedded.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("kd")
    build_tokenizer(root / "tokenizer")
    vocab = len(AutoTokenizer.from_pretrained(root / "tokenizer"))
    synthetic.tiny_llama(vocab).save_pretrained(root / "student")
    synthetic.write_traces(synthetic.synthetic_rows(32, vocab=vocab, k=K, seed=1), root / "traces", files=4)
    return root


def _fit(ray, root: Path, name: str, traces: Path | None = None, **over) -> object:
    from raykd.kd.trainer import build_trainer

    cfg = _train_cfg(root, student_out=str(root / name / "student"), **over)
    data = ray.data.read_parquet(str(traces or root / "traces"))
    return build_trainer(cfg, {"train": data}, str(root / "runs"), name).fit()


def _read_rows(folder: Path) -> dict:
    import pyarrow.parquet as pq

    return pq.read_table(folder).to_pydict()


@pytest.fixture(scope="module")
def crashed_run(ray_local, run_root: Path) -> object:
    """ZeRO-2, 2 workers, 8 steps; the last worker dies after step 3, the run resumes from step 2."""
    return _fit(ray_local, run_root, "crash", crash_after_step=3, tensorboard_dir=str(run_root / "tb"))


@pytest.mark.slow
def test_two_workers_train_checkpoint_and_resume_after_a_crash(crashed_run, run_root: Path):
    from transformers import AutoModelForCausalLM

    m = crashed_run.metrics
    assert m["resumed_from_step"] == 2 and m["step"] == 8  # 32 traces / 8 per step x 2 epochs
    assert m["sequences"] == 64 and m["traces"] == 32 and m["traces_unsupervised"] == 0
    checkpoints = sorted((c.path, c_m) for c, c_m in crashed_run.best_checkpoints)
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
    # counts are exact totals over both epochs, across the crash: what the data says, twice
    _, stats = batching.prepare_examples(
        _read_rows(run_root / "traces"), TrialData(0.5, segments=("cot", "answer"))
    )
    assert (m["kept_tokens"], m["supervised_tokens"]) == (2 * stats.kept_tokens, 2 * stats.supervised_tokens)
    student = Path(m["student_dir"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in student.iterdir()
    }
    trained = AutoModelForCausalLM.from_pretrained(student)
    base = AutoModelForCausalLM.from_pretrained(run_root / "student")
    assert trained.config.vocab_size == base.config.vocab_size
    assert not torch.equal(trained.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert list((run_root / "tb").glob("events.out.tfevents.*"))  # rank 0's TensorBoard log


@pytest.mark.slow
def test_zero3_uninterrupted_run_matches_the_resumed_run(crashed_run, ray_local, run_root: Path):
    """A resume restores weights, optimizer state and data position exactly; ZeRO-3 gives the same result."""
    from safetensors.torch import load_file

    result = _fit(ray_local, run_root, "zero3", zero_stage=3)
    assert result.metrics["resumed_from_step"] == -1 and result.metrics["step"] == 8
    a = load_file(Path(crashed_run.metrics["student_dir"]) / "model.safetensors")
    b = load_file(Path(result.metrics["student_dir"]) / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert result.metrics["loss"] == pytest.approx(crashed_run.metrics["loss"], rel=1e-4)


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
    examples, _ = batching.prepare_examples(rows, TrialData(1.0))
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
