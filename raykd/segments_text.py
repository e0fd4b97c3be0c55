"""Segmentation of text traces (trace datasets such as Bespoke-Stratos): the think markers are found by
character offsets in the completion's text and mapped onto its tokens, so BPE merges cannot hide them; the
decision (P / CoT / A boundaries, flags) is `raykd.segments.decide`, the same as for token ids.

Pure numpy and the standard library; the tokenizer is passed in.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np

from raykd.segments import Ragged, Segmentation, TagStats, decide

_STAT_DTYPES = (np.int64, np.int64, np.int64, np.int64, bool, bool, bool, bool)  # TagStats fields


def _find_all(text: str, sub: str) -> list[int]:
    out, q = [], text.find(sub)
    while q != -1:
        out.append(q)
        q = text.find(sub, q + 1)
    return out


def _text_facts(
    prompt: str, text: str, starts: list[int], n_prompt: int, open_text: str, close_text: str
) -> tuple:
    """TagStats fields for one example, from character positions mapped onto tokens (token i starts at char
    starts[i]; a token holding any character of a tag belongs to the tag)."""
    opens, closes = _find_all(text, open_text), _find_all(text, close_text)

    def span(q: int, size: int) -> tuple[int, int, bool]:
        first = bisect.bisect_right(starts, q) - 1
        last = bisect.bisect_right(starts, q + size - 1) - 1
        end_char = starts[last + 1] if last + 1 < len(starts) else len(text)
        return first, last + 1, starts[first] != q or end_char != q + size

    spans = [span(q, len(open_text)) for q in opens] + [span(q, len(close_text)) for q in closes]
    po, pc = prompt.rfind(open_text), prompt.rfind(close_text)
    last_close = (n_prompt + spans[-1][0], n_prompt + spans[-1][1]) if closes else (-1, -1)
    block = opens[0] + len(open_text) if opens and (not closes or opens[0] < closes[0]) else 0
    return (
        len(opens),
        len(closes),
        *last_close,
        po >= 0 or pc >= 0,
        po > pc and not prompt[po + len(open_text) :].strip(),
        bool(closes) and not text[block : closes[0]].strip(),
        any(s[2] for s in spans),
    )


def segment_texts(
    prompts: Sequence[str],
    completions: Sequence[str],
    tokenizer: Any,
    open_text: str = "<think>",
    close_text: str = "</think>",
    eos_id: int | None = None,
) -> tuple[Ragged, Segmentation]:
    """Tokenize and segment text traces, e.g. Bespoke-Stratos ("<|begin_of_thought|>", "<|end_of_thought|>").

    prompts: chat-formatted prompt texts (tokenized as they are, no special tokens added); completions: the
    assistant's texts, tokenized on their own with a fast tokenizer's offset mapping; eos_id, if given, is
    appended to every completion. Markers are found by character offsets, so BPE merges cannot hide them.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:  # the tokenizer refuses an empty batch
        return Ragged.from_rows([]), decide(
            TagStats(*(np.zeros(0, t) for t in _STAT_DTYPES)), np.zeros(1, np.int64), np.zeros(0, np.int64)
        )
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    enc = tokenizer(list(completions), add_special_tokens=False, return_offsets_mapping=True)
    rows, facts = [], []
    columns = (prompts, completions, p_ids, enc["input_ids"], enc["offset_mapping"])
    for prompt, text, pids, cids, offs in zip(*columns, strict=True):
        starts = [s for s, _ in offs]
        facts.append(_text_facts(prompt, text, starts, len(pids), open_text, close_text))
        rows.append([*pids, *cids, *([] if eos_id is None else [eos_id])])
    seqs = Ragged.from_rows(rows, np.int64)
    cols = list(zip(*facts, strict=True))
    stats = TagStats(*(np.array(col, dtype) for col, dtype in zip(cols, _STAT_DTYPES, strict=True)))
    prompt_lens = np.array([len(p) for p in p_ids], np.int64)
    return seqs, decide(stats, seqs.offsets, prompt_lens)
