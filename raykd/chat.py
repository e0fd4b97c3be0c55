"""The chat format of a sweep: the teacher's template, its end-of-turn token and the ids generation stops on.

The traces are rendered with the teacher's tokenizer and chat template (`chat_prompt_ids`)
and end with the template's end-of-turn token, so that is the format the student learns. The trained student
is saved with that tokenizer and template and a generation_config.json whose eos_token_id lists the
end-of-turn token and the student's own EOS (`write_generation_config`); evaluation renders its prompts the
same way and stops on the same ids (`stop_ids`). A base model's EOS (``<|endoftext|>``) is usually not the
instruct template's end-of-turn (``<|im_end|>``): without this, a trained base student would run on past its
answer to ``max_tokens``.

Reads tokenizers (transformers) and JSON files only; no torch.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from raykd import _compat
from raykd.files import read_model_config, write_json_atomic

# Assistant content whose rendering shows what the template writes right after a turn.
_SENTINEL = "RAYKDENDOFTURNPROBE"


@functools.lru_cache(maxsize=4)
def load_tokenizer(tokenizer_dir: str, trust_remote_code: bool = False) -> Any:
    """A folder's tokenizer, loaded once per process (stages call this for every batch)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt as the teacher sees it: one user turn, chat template, assistant header appended. The
    traces, the embedded models' training and evaluation all render prompts with this."""
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    return _compat.token_ids(encoded)


def end_of_turn(tokenizer: Any) -> int | None:
    """The token the chat template writes right after an assistant turn (``<|im_end|>`` in ChatML,
    ``<|eot_id|>`` in Llama 3), when that is a special token; else the tokenizer's EOS; None if neither."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # templates may refuse some conversations; the EOS is the fallback then
            text = ""
        if _SENTINEL in text:
            after = text[text.rindex(_SENTINEL) + len(_SENTINEL) :]
            ids = tokenizer.encode(after, add_special_tokens=False) if after else []
            if ids and ids[0] in tokenizer.added_tokens_decoder:
                return int(ids[0])
    return tokenizer.eos_token_id


def model_eos_ids(model_dir: str | Path) -> list[int]:
    """The EOS ids a model folder declares (generation_config.json first, then config.json)."""
    found: list[int] = []
    path = Path(model_dir) / "generation_config.json"
    generation = json.loads(path.read_text()) if path.is_file() else {}
    for data in (generation, read_model_config(model_dir)):  # config.json: its text model's part first
        value = data.get("eos_token_id")
        for eos in value if isinstance(value, list) else [value]:
            if isinstance(eos, int) and eos not in found:
                found.append(eos)
    return found


def stop_ids(tokenizer: Any, model_dir: str | Path) -> list[int]:
    """The template's end-of-turn token first, then the model's own EOS ids (no repeats)."""
    ids = [end_of_turn(tokenizer), *model_eos_ids(model_dir)]
    return list(dict.fromkeys(i for i in ids if i is not None))


def write_generation_config(folder: str | Path, tokenizer: Any, base_dir: str | Path) -> list[int]:
    """Make ``folder``'s generation_config.json stop on the template's end-of-turn and ``base_dir``'s EOS
    (the base student's); its other fields (from the model's save) are kept. Returns the EOS ids written."""
    path = Path(folder) / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    eos = stop_ids(tokenizer, base_dir)
    config["eos_token_id"] = eos
    if config.get("pad_token_id") is None and tokenizer.pad_token_id is not None:
        config["pad_token_id"] = tokenizer.pad_token_id
    write_json_atomic(path, config, sort_keys=False, newline=True)
    return eos
