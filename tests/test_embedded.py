"""The embedded default: local tokenizer, greedy decoding, cached teacher + student base bootstrap."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from raykd.problems.tasks import TASKS, make_problems, reference_completion

# Small enough that a bootstrap runs in seconds; the numbers are not meaningful, the plumbing is.
TINY = {
    "teacher": {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128},
    "student": {"layers": 1, "hidden": 64, "heads": 2, "intermediate": 128},
    "recipe": {"max_steps": 6, "batch_size": 8, "warmup_steps": 2, "check_every": 3},
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from raykd.embedded import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


# --- tokenizer ----------------------------------------------------------------------------------------------


def test_tokenizer_folder_is_an_ordinary_hf_tokenizer(tokenizer_dir: Path, tokenizer) -> None:
    from transformers import PreTrainedTokenizerFast

    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tokenizer_dir.iterdir()}
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for tag in ("<think>", "</think>", "<|im_start|>", "<|im_end|>"):
        ids = tokenizer(f"a{tag}b", add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_tokens_to_ids(tag) in ids and len(ids) == 3, tag


def test_chat_template_is_chatml(tokenizer) -> None:
    messages = [{"role": "user", "content": "cups 3 , ball under 1 . swaps : 1 ) 1 2"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert (
        text == "<|im_start|>user\ncups 3 , ball under 1 . swaps : 1 ) 1 2<|im_end|>\n<|im_start|>assistant\n"
    )
    full = [*messages, {"role": "assistant", "content": "<think> x</think> 2"}]
    assert tokenizer.apply_chat_template(full, tokenize=False).endswith(
        "<|im_start|>assistant\n<think> x</think> 2<|im_end|>\n"
    )


@pytest.mark.parametrize("task", TASKS)
def test_task_text_round_trips_one_token_per_word(tokenizer, task: str) -> None:
    for knobs in ({}, {"steps": 3}):
        for problem in make_problems(task, "eval", 20, seed=0, **knobs):
            text = reference_completion(problem)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids) == text
            # Every word, digit and punctuation mark of the task is a single token: tokens = pre-tokens.
            words = re.findall(r" ?[a-z]+| ?\d| ?[^\sa-z\d<]+|</?think>", text)
            assert len(ids) == len(words)


def test_any_text_encodes_losslessly(tokenizer) -> None:
    text = "Ünïcode ✓, tabs\tand\nnew lines; 3.14159 <think>x</think>"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_tokenizer_is_deterministic(tokenizer_dir: Path, tmp_path: Path) -> None:
    from raykd.embedded import build_tokenizer

    again = build_tokenizer(tmp_path / "again")
    assert (again / "tokenizer.json").read_text() == (tokenizer_dir / "tokenizer.json").read_text()


@pytest.mark.parametrize("task", TASKS)
def test_traces_have_reasoning_proportions(tokenizer, task: str) -> None:
    from raykd.embedded.bootstrap import sequence_shape

    shape = sequence_shape(tokenizer, make_problems(task, "eval", 64, seed=0))
    assert shape["cot_share"] >= 0.75  # the design target: most tokens are reasoning
    assert shape["answer_share"] < 0.02
    assert shape["prompt_share"] + shape["cot_share"] + shape["answer_share"] == pytest.approx(1, abs=1e-3)
    # A lead span of 0.5 ends inside the chain of thought, not in the prompt.
    assert shape["prompt_mean"] < 0.5 * shape["length_mean"] < shape["prompt_mean"] + shape["cot_mean"]


# --- greedy decoding ----------------------------------------------------------------------------------------


def test_greedy_ids_match_transformers_generate(tokenizer) -> None:
    import torch

    from raykd.chat import chat_prompt_ids
    from raykd.embedded.bootstrap import ModelSize, new_model
    from raykd.embedded.train import greedy_ids

    torch.manual_seed(0)
    model = new_model(ModelSize(layers=2, hidden=64, heads=2, intermediate=128), tokenizer).eval()
    # Prompts of different lengths, so left padding and position ids matter.
    prompts = [chat_prompt_ids(tokenizer, p.prompt) for p in make_problems("modchain", "eval", 2, 0, steps=1)]
    prompts += [chat_prompt_ids(tokenizer, p.prompt) for p in make_problems("cups", "eval", 2, 0, steps=4)]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ours = greedy_ids(model, prompts, 12, eos, pad)
    for prompt, row in zip(prompts, ours, strict=True):
        reference = model.generate(
            input_ids=torch.tensor([prompt]),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )[0, len(prompt) :].tolist()
        assert row == (reference[: reference.index(eos)] if eos in reference else reference)


# --- bootstrap ----------------------------------------------------------------------------------------------


def _tiny_bootstrap(cache: Path, seed: int = 0, lines: list[str] | None = None, **knobs: int):
    from raykd.embedded import ModelSize, Recipe, bootstrap

    recipe = Recipe(**TINY["recipe"])
    return bootstrap(
        "cups",
        seed,
        cache,
        teacher=ModelSize(**TINY["teacher"]),
        student=ModelSize(**TINY["student"]),
        teacher_recipe=recipe,
        student_recipe=recipe,
        n_eval=8,
        n_check=8,
        threads=1,  # tiny matrices: a second thread only adds synchronisation on a busy machine
        log=(lines if lines is not None else []).append,
        **{"steps": 2, **knobs},
    )


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedded")


def test_bootstrap_builds_caches_and_reuses(tiny_cache: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    lines: list[str] = []
    built = _tiny_bootstrap(tiny_cache, lines=lines)
    folder = built.teacher_dir.parent
    assert folder.parent == tiny_cache and folder.name.startswith("cups-")
    info = json.loads((folder / "embedded.json").read_text())
    assert info["teacher"]["accuracy"] == built.teacher_accuracy and 0 <= built.teacher_accuracy <= 1
    assert info["student"]["accuracy"] == built.student_accuracy and info["knobs"] == {"cups": 5, "steps": 2}
    assert info["right_share"] == 0.25 and info["teacher"]["steps"] <= 6

    teacher_config, student_config = (
        AutoConfig.from_pretrained(built.teacher_dir),
        AutoConfig.from_pretrained(built.student_dir),
    )
    assert teacher_config.model_type == student_config.model_type == "llama"
    assert (
        teacher_config.vocab_size
        == student_config.vocab_size
        == len(AutoTokenizer.from_pretrained(built.tokenizer_dir))
    )
    assert student_config.num_hidden_layers < teacher_config.num_hidden_layers
    assert teacher_config.hidden_size // teacher_config.num_attention_heads >= 32
    assert (built.teacher_dir / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(built.student_dir)
    assert next(model.parameters()).dtype == torch.float32
    assert AutoTokenizer.from_pretrained(
        built.teacher_dir
    ).chat_template  # each model folder loads on its own

    # What a killed build leaves: a temporary folder beside the cache entry, removed by the next call.
    (tiny_cache / f".{folder.name}.killed" / "teacher").mkdir(parents=True)
    again = _tiny_bootstrap(tiny_cache, lines=lines)
    assert again == built and "reused" in lines[-1]
    # Only the finished folder and its lock file: no temporary folder left behind.
    assert sorted(p.name for p in tiny_cache.iterdir()) == [f".{folder.name}.lock", folder.name]


def test_bootstrap_key_follows_its_inputs(tiny_cache: Path) -> None:
    first = _tiny_bootstrap(tiny_cache, seed=0)  # built by the test above
    other_seed = _tiny_bootstrap(tiny_cache, seed=1)
    assert other_seed.teacher_dir.parent != first.teacher_dir.parent
    assert other_seed.info["seed"] == 1 and first.info["seed"] == 0


def test_a_failed_bootstrap_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed mid-training")

    import raykd.embedded  # noqa: F401  (loads the module patched below)

    # raykd.embedded.bootstrap names the function (re-exported by the package); patch the module itself.
    monkeypatch.setattr(sys.modules["raykd.embedded.bootstrap"], "_train_model", crash)
    with pytest.raises(RuntimeError, match="killed mid-training"):
        _tiny_bootstrap(tmp_path)
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_bad_model_shape_is_refused(tokenizer) -> None:
    from raykd.embedded.bootstrap import ModelSize, new_model

    with pytest.raises(ValueError, match=">= 32"):
        new_model(ModelSize(layers=1, hidden=64, heads=4), tokenizer)


# cups is the embedded default (sweeps/tiny.yaml). modchain's full bootstrap with its current chain has not
# been measured to reach the 0.95 teacher target (the previous chain reached 0.926): not claimed here.
@pytest.mark.slow
@pytest.mark.parametrize("task", ["cups"])
def test_full_bootstrap_teacher_solves_and_student_base_does_not(task: str, cache_dir: Path) -> None:
    from raykd.embedded import bootstrap

    built = bootstrap(task, 0, cache_dir / "embedded")
    assert built.teacher_accuracy >= 0.95
    assert built.student_accuracy <= built.teacher_accuracy - 0.3
    # The student base reasons the common, sloppy way (its greedy answers follow the slip), not at random.
    assert built.info["student"]["sloppy_agreement"] >= 0.6
    assert built.info["sequence"]["cot_share"] >= 0.75
