"""The trained student as a Hugging Face folder: weights, config, the traces' tokenizer and chat template, and
a generation config that stops where the template ends a turn."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from raykd.files import atomic_folder
from raykd.plan import ModelPaths


def save_student(engine: Any, zero_stage: int, out: str, models: ModelPaths, rank: int) -> None:
    """Write the student to `out` as a Hugging Face folder (config, safetensors, tokenizer, template).

    A collective under ZeRO-3 (the partitioned weights are gathered to rank 0); rank 0 writes, atomically.
    """
    import torch

    from raykd._compat import zero3_full_state_dict

    if zero_stage == 3:
        state = zero3_full_state_dict(engine)  # every rank must call it
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank != 0 or state is None:
        return
    # Keys are KDStudent's ("model.<hf key>"): strip the wrapper's prefix.
    state = {k.removeprefix("model."): v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_folder(out) as folder:
        model = engine.module.model
        model.config.dtype = next(iter(state.values())).dtype if state else torch.float32
        model.save_pretrained(folder, state_dict=state)
        _copy_side_files(models, folder)
        for item in folder.iterdir():
            item.chmod(0o644)


def _copy_side_files(models: ModelPaths, folder: Path) -> None:
    """The tokenizer and chat template the traces were made with (the teacher's), and a
    generation_config.json that stops on the template's end-of-turn token and the base student's own EOS
    (raykd.chat), so vLLM and transformers generate in the format the student was trained on; the base's
    licence files come along."""
    from raykd import chat

    tokenizer = chat.load_tokenizer(models.tokenizer_dir, models.trust_remote_code)
    tokenizer.save_pretrained(folder)
    chat.write_generation_config(folder, tokenizer, models.student_dir)
    for item in Path(models.student_dir).glob("*"):
        if item.is_file() and item.name.upper().startswith(("LICENSE", "NOTICE")):
            shutil.copy2(item, folder / item.name)
