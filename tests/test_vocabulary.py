"""Teacher and student vocabularies and the chat format, checked on the driver before any generation.

Fast: folders of small real Llama models and a locally trained BPE tokenizer (ChatML template, the one the
embedded models use); the online-teacher KD on a padded pair against an independent full-logits reference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from raykd import chat
from raykd.kd import batching, step, synthetic
from raykd.kd.examples import TrialData, prepare_examples
from raykd.kd.losses import token_losses
from raykd.kd.model import KDStudent, OnlineTeacher
from raykd.kd.teachers import FullVocabTeacher
from raykd.spec import LossSpec
from raykd.traces import checks, generate_traces
from raykd.traces.pipeline import preflight
from tests.test_traces import make_problems, make_spec

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from raykd.embedded.tokenizer import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("vocab") / "tokenizer")


def model_folder(folder: Path, tokenizer_dir: Path, rows: int, seed: int = 0) -> Path:
    """A random Llama with ``rows`` embedding rows, saved with the tokenizer (rows may pad past it)."""
    synthetic.tiny_llama(rows, hidden=64, heads=2, seed=seed).save_pretrained(folder)
    for item in tokenizer_dir.iterdir():
        shutil.copy2(item, folder / item.name)
    return folder


def base_student(folder: Path, tokenizer_dir: Path, rows: int) -> Path:
    return as_base(model_folder(folder, tokenizer_dir, rows))


def as_base(folder: Path) -> Path:
    """Turn a model folder into one like a base checkpoint: same vocabulary, EOS <|endoftext|> (not the
    template's <|im_end|>) in its tokenizer, config and generation config, no chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    tokenizer.chat_template = None
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(folder)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        data = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**data, "eos_token_id": eos}))
    return folder


def renamed_token(folder: Path, old: str, new: str) -> Path:
    """The same tokenizer with one special token spelled otherwise (its id now means another token)."""
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab[new] = vocab.pop(old)
    for added in data["added_tokens"]:
        added["content"] = new if added["content"] == old else added["content"]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


def test_padded_pair_passes_the_driver_checks(tokenizer_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    teacher = model_folder(tmp_path / "teacher", tokenizer_dir, n + 64)  # padded, as Qwen2.5-7B vs 0.5B
    student = model_folder(tmp_path / "student", tokenizer_dir, n)
    checks.check_vocabulary(str(teacher), str(student))
    checks.check_vocabulary(str(teacher), str(student), str(teacher))  # with the traces' tokenizer named
    preflight(make_spec(), str(teacher), str(teacher), str(student))
    # the other way round too: a student with more rows than the teacher
    checks.check_vocabulary(str(student), str(teacher))
    short = model_folder(tmp_path / "short", tokenizer_dir, n - 1)
    with pytest.raises(checks.SetupError, match=rf"emits ids up to {n - 1} but .* has {n - 1} rows"):
        checks.check_vocabulary(str(teacher), str(short))


@pytest.mark.parametrize("extra", [(32, 0), (0, 32)], ids=["teacher-padded", "student-padded"])
def test_online_kd_on_a_padded_pair_compares_the_shared_rows(extra: tuple[int, int]) -> None:
    """Online KD = forward KL between the two models' distributions over the rows both have, with the CE
    over the same rows; checked against HF's own full logits, sliced."""
    vocab = 96
    t_rows, s_rows = vocab + extra[0], vocab + extra[1]
    student = synthetic.tiny_llama(s_rows, hidden=64, heads=2)
    teacher_model = synthetic.tiny_llama(t_rows, hidden=128, heads=4, seed=1)
    teacher = OnlineTeacher(teacher_model)
    rows = synthetic.synthetic_rows(3, vocab=vocab, k=4, seed=5)
    examples, _ = prepare_examples(rows, TrialData(fraction=0.7))
    mb = batching.collate(examples, 4)
    batch = step.to_device(mb, CPU)
    batch["teacher_hidden"] = teacher.hidden(batch["input_ids"], batch["flat_pos"])
    batch["teacher_weight"] = teacher.weight
    cfg = LossSpec()
    out = KDStudent(student, cfg, chunk_size=5)(**batch)
    pos, ids = torch.from_numpy(mb.flat_pos), torch.from_numpy(mb.input_ids)
    with torch.no_grad():
        s_logits = student(ids).logits.reshape(-1, s_rows)[pos][:, :vocab]
        t_logits = teacher_model(ids).logits.reshape(-1, t_rows)[pos][:, :vocab]
    ref = token_losses(s_logits, torch.from_numpy(mb.target_ids), FullVocabTeacher(t_logits), cfg)
    torch.testing.assert_close(out[0], (0.5 * ref.ce + 0.5 * ref.kd).sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2], ref.kd.sum(), rtol=1e-5, atol=1e-5)
    out[0].backward()
    grad = student.get_output_embeddings().weight.grad
    assert grad[:vocab].abs().sum() > 0 and (extra[1] == 0 or grad[vocab:].abs().sum() == 0)


def test_one_token_mapped_otherwise_is_refused_before_generation(tokenizer_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    teacher = model_folder(tmp_path / "teacher", tokenizer_dir, n)
    student = renamed_token(model_folder(tmp_path / "student", tokenizer_dir, n), "<think>", "<reason>")
    think = AutoTokenizer.from_pretrained(tokenizer_dir).convert_tokens_to_ids("<think>")
    out = tmp_path / "out"
    with pytest.raises(checks.SetupError) as caught:
        generate_traces(
            make_spec(), make_problems("cups", "train", 2, 0), teacher, teacher, out, student_dir=student
        )
    message = str(caught.value)
    assert f"student.model {student} does not share the vocabulary of teacher.model {teacher}" in message
    first = f"first id {think}: '<think>' for the teacher, '<reason>' for the student"
    assert f"1 id(s) map to other tokens, {first}" in message
    assert not out.exists()  # refused before any folder, Ray or engine


def test_end_of_turn_and_stops_of_a_base_student(tokenizer_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    teacher_tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    base = base_student(tmp_path / "base", tokenizer_dir, n)
    im_end, endoftext = (teacher_tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
    assert chat.end_of_turn(teacher_tok) == im_end
    # the base has no template: its own EOS is all it knows
    assert chat.end_of_turn(AutoTokenizer.from_pretrained(base)) == endoftext
    assert chat.stop_ids(teacher_tok, base) == [im_end, endoftext]
    folder = tmp_path / "trained"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": endoftext, "do_sample": True}))
    assert chat.write_generation_config(folder, teacher_tok, base) == [im_end, endoftext]
    written = json.loads((folder / "generation_config.json").read_text())
    assert written == {"eos_token_id": [im_end, endoftext], "do_sample": True, "pad_token_id": endoftext}
    # the driver accepts the base student (the teacher's template is used)
    teacher = model_folder(tmp_path / "teacher", tokenizer_dir, n)
    preflight(make_spec(), str(teacher), str(teacher), str(base))


def test_no_chat_template_anywhere_is_refused_naming_both_models(tokenizer_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    teacher = base_student(tmp_path / "teacher", tokenizer_dir, n)
    student = base_student(tmp_path / "student", tokenizer_dir, n)
    out = tmp_path / "out"
    with pytest.raises(checks.SetupError) as caught:
        generate_traces(
            make_spec(), make_problems("cups", "train", 2, 0), teacher, teacher, out, student_dir=student
        )
    message = str(caught.value)
    assert f"teacher.model {teacher} has no chat template, nor has student.model {student}" in message
    assert not out.exists()
    with_template = model_folder(tmp_path / "instruct", tokenizer_dir, n)
    with pytest.raises(checks.SetupError, match=r"has no chat template \(student.model .* has one\)"):
        preflight(make_spec(), str(teacher), str(teacher), str(with_template))


def test_sweep_without_any_chat_template_exits_2_before_ray(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command a user types: a base teacher and a base student (no template in either) exit 2 on the
    driver, naming both spec keys and the fix, before Ray starts or any trace folder exists."""
    import ray
    import yaml
    from transformers import AutoTokenizer

    from raykd.sweep import main

    n = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    teacher = base_student(tmp_path / "teacher", tokenizer_dir, n)
    student = base_student(tmp_path / "student", tokenizer_dir, n)
    data = {
        "name": "no-template",
        "problems": {"source": "builtin", "task": "cups", "train_size": 4, "eval_size": 2},
        "teacher": {"model": str(teacher)},
        "student": {"model": str(student)},
        "sweep": {"truncation": [1.0], "segments": [["cot"]]},
        "output": {"dir": str(tmp_path / "runs")},
    }
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert main([str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"teacher.model {teacher} has no chat template, nor has student.model {student}" in err
    assert "use an instruct teacher (its tokenizer_config.json holds a chat_template)" in err
    assert not ray.is_initialized()
    assert not (tmp_path / "runs" / "traces").exists()
