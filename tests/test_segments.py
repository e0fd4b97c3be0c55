"""Segmentation on ids: every edge case with exact labels, for single-token and multi-token think tags.

The toy vocabulary has `<think>` / `</think>` both as single special tokens (Qwen3-like) and as BPE
pieces (`<` / `</`, `think`, `>`), with merged variants (` <`, ` </`, `>.`). A property test compares
`segment_ids` with a plain character-level reference on random sequences.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raykd.segments import (
    ANSWER,
    COT,
    MAX_SPACE_GAP,
    PROMPT,
    Ragged,
    SegFlag,
    ThinkTags,
    count_flags,
    segment_ids,
)

PIECES = ["<pad>", "a", "b", "c", " ", "\n", "\n\n", "<think>", "</think>", "<eos>",
          "<", "</", "think", ">", " </", ">.", " <", "Q"]  # fmt: skip
ID = {p: i for i, p in enumerate(PIECES)}
SINGLE = ThinkTags(PIECES, [ID["<think>"]], [ID["</think>"]])
MULTI = ThinkTags(PIECES, [ID["<"], ID["think"], ID[">"]], [ID["</"], ID["think"], ID[">"]])
TAG_IDS = {
    "single": {"OPEN": [7], "CLOSE": [8]},
    "multi": {"OPEN": [10, 12, 13], "CLOSE": [11, 12, 13]},
}
F = SegFlag


def build(kind: str, prompt: list[str], completion: list[str]) -> tuple[list[int], int]:
    """Token ids from symbols: OPEN / CLOSE become the tag's ids for that kind, others are pieces."""

    def ids(symbols: list[str]) -> list[int]:
        return [i for s in symbols for i in TAG_IDS[kind].get(s, [ID.get(s, -1)])]

    p = ids(prompt)
    return p + ids(completion), len(p)


def segment_one(kind: str, prompt: list[str], completion: list[str]) -> tuple[list[int], int]:
    seq, n_prompt = build(kind, prompt, completion)
    seg = segment_ids(Ragged.from_rows([seq]), np.array([n_prompt]), SINGLE if kind == "single" else MULTI)
    return seg.labels().tolist(), int(seg.flags[0])


def expected(kind: str, p: list[str], c: list[str], a: list[str]) -> list[int]:
    sizes = [len(build(kind, part, [])[0]) for part in (p, c, a)]
    return [PROMPT] * sizes[0] + [COT] * sizes[1] + [ANSWER] * sizes[2]


# (name, prompt, cot part of the completion, answer part, flags)
CASES = [
    ("plain", ["Q", "a"], ["OPEN", "a", "b", "CLOSE"], ["\n\n", "b", "<eos>"], 0),
    ("no_close_tag", ["Q"], ["OPEN", "a", "b", "c"], [], F.NO_CLOSE_TAG),
    ("no_open_tag", ["Q"], ["a", "b", "CLOSE"], ["b"], F.NO_OPEN_TAG),
    ("no_think_tags", ["Q"], [], ["a", "b", "<eos>"], F.NO_THINK_TAGS),
    ("empty_cot_adjacent", ["Q"], ["OPEN", "CLOSE"], ["b"], F.EMPTY_COT),
    ("empty_cot_whitespace", ["Q"], ["OPEN", "\n", "\n\n", "CLOSE"], ["b"], F.EMPTY_COT),
    ("empty_no_answer", ["Q"], ["OPEN", " ", "CLOSE"], [], F.EMPTY_COT),
    (
        "multiple_blocks",
        ["Q"],
        ["OPEN", "a", "CLOSE", "b", "OPEN", "c", "CLOSE"],
        ["b", "<eos>"],
        F.MULTIPLE_THINK_BLOCKS,
    ),
    ("two_closes", ["Q"], ["OPEN", "a", "CLOSE", "b", "CLOSE"], ["c"], F.MULTIPLE_THINK_BLOCKS),
    ("text_before_open", ["Q"], ["b", "\n", "OPEN", "a", "CLOSE"], ["c"], 0),
    (
        "balanced_tags_in_prompt",
        ["Q", "OPEN", "a", "CLOSE", "Q"],
        ["OPEN", "a", "CLOSE"],
        ["b"],
        F.TAG_IN_PROMPT,
    ),
    ("open_mid_prompt", ["Q", "OPEN", "a"], [], ["b", "c"], F.TAG_IN_PROMPT | F.NO_THINK_TAGS),
    ("close_in_prompt_only", ["Q", "CLOSE"], [], ["b"], F.TAG_IN_PROMPT | F.NO_THINK_TAGS),
    (
        "prompt_opens_think",
        ["Q", "OPEN", "\n"],
        ["a", "b", "CLOSE"],
        ["c"],
        F.TAG_IN_PROMPT | F.PROMPT_OPENS_THINK,
    ),
    (
        "prompt_opens_no_close",
        ["Q", "OPEN"],
        ["a", "b"],
        [],
        F.TAG_IN_PROMPT | F.PROMPT_OPENS_THINK | F.NO_CLOSE_TAG,
    ),
    (
        "prompt_opens_empty",
        ["Q", "OPEN", "\n"],
        ["\n\n", "CLOSE"],
        ["a"],
        F.TAG_IN_PROMPT | F.PROMPT_OPENS_THINK | F.EMPTY_COT,
    ),
    ("empty_completion", ["Q", "a"], [], [], F.NO_THINK_TAGS),
    ("tag_at_sequence_end", ["Q"], ["OPEN"], [], F.NO_CLOSE_TAG),
]


@pytest.mark.parametrize("kind", ["single", "multi"])
@pytest.mark.parametrize(("name", "prompt", "cot", "answer", "flags"), CASES, ids=[c[0] for c in CASES])
def test_edge_cases_exact_labels(kind, name, prompt, cot, answer, flags) -> None:
    labels, got_flags = segment_one(kind, prompt, cot + answer)
    assert labels == expected(kind, prompt, cot, answer)
    assert SegFlag(got_flags) == SegFlag(flags)


def test_whole_batch_equals_one_by_one_and_counts() -> None:
    rows, n_prompts, want_labels, want_flags = [], [], [], []
    for kind in ("single", "multi"):
        for _, prompt, cot, answer, flags in CASES:
            seq, n_prompt = build(kind, prompt, cot + answer)
            rows.append(seq)
            n_prompts.append(n_prompt)
            want_labels += expected(kind, prompt, cot, answer)
            want_flags.append(int(flags))
    # The multi-token vocabulary also knows the single-token tags, so it segments both halves.
    seg = segment_ids(Ragged.from_rows(rows), np.array(n_prompts), MULTI)
    assert seg.labels().tolist() == want_labels
    assert seg.flags.tolist() == want_flags
    counts = seg.counts()
    assert counts["examples"] == 2 * len(CASES)
    assert counts["no_close_tag"] == 2 * 3 and counts["multiple_think_blocks"] == 2 * 2
    assert counts == {"examples": len(rows), **count_flags(np.array(want_flags))}


def test_exact_boundaries_for_a_multi_token_trace() -> None:
    # prompt: Q a | completion: < think > a \n </ think > \n\n b <eos>
    seq = [17, 1, 10, 12, 13, 1, 5, 11, 12, 13, 6, 2, 9]
    seg = segment_ids(Ragged.from_rows([seq]), np.array([2]), MULTI)
    assert (seg.prompt_ends.tolist(), seg.close_starts.tolist(), seg.answer_starts.tolist()) == (
        [2],
        [7],
        [10],
    )
    assert seg.segment_lengths().tolist() == [[2, 8, 3]]
    assert seg.labels().tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2]


def test_merged_close_tag_counts_the_whole_merged_tokens_as_cot() -> None:
    # Q | < think > a ' </' think '>.' b: the BPE merged a space into the first token, '.' into the last
    seq = [17, 10, 12, 13, 1, 14, 12, 15, 2]
    seg = segment_ids(Ragged.from_rows([seq]), np.array([1]), MULTI)
    assert seg.labels().tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 2]
    assert seg.close_starts.tolist() == [5] and SegFlag(int(seg.flags[0])) == F.MERGED_TAG


def test_merged_open_tag() -> None:
    seq = [17, 1, 16, 12, 13, 2, 11, 12, 13, 3]  # Q | a ' <' think > b </ think > c
    seg = segment_ids(Ragged.from_rows([seq]), np.array([1]), MULTI)
    assert seg.labels().tolist() == [0] + [1] * 8 + [2]
    assert SegFlag(int(seg.flags[0])) == F.MERGED_TAG


def test_core_token_alone_is_not_a_tag() -> None:
    seq = [17, 10, 12, 1, 12, 13, 2]  # Q | < think a think > b : no "<think>" in the text
    seg = segment_ids(Ragged.from_rows([seq]), np.array([1]), MULTI)
    assert seg.labels().tolist() == [0] + [2] * 6
    assert SegFlag(int(seg.flags[0])) == F.NO_THINK_TAGS


def test_tags_never_match_across_sequences() -> None:
    # Row 0 ends with "</", "think"; row 1 starts with ">": together they would spell "</think>".
    rows = [[17, 1, 11, 12], [13, 1, 2]]
    seg = segment_ids(Ragged.from_rows(rows), np.array([1, 1]), MULTI)
    assert seg.labels().tolist() == [0, 2, 2, 2, 0, 2, 2]
    assert seg.flags.tolist() == [int(F.NO_THINK_TAGS)] * 2


def test_tag_straddling_the_prompt_end_belongs_to_the_prompt() -> None:
    seq = [17, 10, 12, 13, 1, 11, 12, 13, 2]  # prompt: Q < think | completion: > a </ think > b
    seg = segment_ids(Ragged.from_rows([seq]), np.array([3]), MULTI)
    assert SegFlag(int(seg.flags[0])) == F.TAG_IN_PROMPT | F.NO_OPEN_TAG
    assert seg.labels().tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 2]


def test_long_whitespace_run_is_not_an_empty_cot() -> None:
    gap = ["\n"] * (MAX_SPACE_GAP + 1)
    labels, flags = segment_one("single", ["Q"], ["OPEN", *gap, "CLOSE", "b"])
    assert flags == 0 and labels == [0] + [1] * (MAX_SPACE_GAP + 3) + [2]


def test_empty_batch_and_bad_prompt_lengths() -> None:
    seg = segment_ids(Ragged.from_rows([]), np.array([], np.int64), SINGLE)
    assert seg.labels().tolist() == [] and seg.counts()["examples"] == 0
    with pytest.raises(ValueError, match="prompt_lens"):
        segment_ids(Ragged.from_rows([[1, 2]]), np.array([3]), SINGLE)


def test_think_tags_are_validated() -> None:
    with pytest.raises(ValueError, match="must not contain"):
        ThinkTags(["<t>", "<t>x"], [0], [1])
    with pytest.raises(ValueError, match="at least one token"):
        ThinkTags(["<t>"], [], [0])
    assert MULTI.texts == ("<think>", "</think>")


def test_tag_ids_with_a_prefix_space_are_stripped() -> None:
    """A tokenizer adding a prefix space encodes "<think>" as " <", "think", ">"; the tag is "<think>"."""
    tags = ThinkTags(PIECES, [ID[" <"], ID["think"], ID[">"]], [ID["</"], ID["think"], ID[">"]])
    assert tags.texts == ("<think>", "</think>")
    seg = segment_ids(Ragged.from_rows([[17, 5, 10, 12, 13, 1, 11, 12, 13, 2]]), np.array([1]), tags)
    assert seg.labels().tolist() == [0] + [1] * 8 + [2]
    with pytest.raises(ValueError, match="whitespace only"):
        ThinkTags(PIECES, [ID["\n"]], [ID["</think>"]])


def test_ids_beyond_the_vocabulary_are_plain_tokens() -> None:
    seg = segment_ids(Ragged.from_rows([[17, 7, 1000, 8, 2]]), np.array([1]), SINGLE)
    assert seg.labels().tolist() == [0, 1, 1, 1, 2]


def test_from_tokenizer_with_special_tags() -> None:
    """A locally trained BPE with `<think>` / `</think>` as special tokens, as in Qwen3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>", "<think>", "</think>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(["two plus two is four", "so the answer is four"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    tags = ThinkTags.from_tokenizer(tok)
    assert (tags.open_ids, tags.close_ids) == ((1,), (2,))
    prompt, cot, answer = tok.encode("two plus two?"), tok.encode("so four"), tok.encode(" four")
    seq = [*prompt, 1, *cot, 2, *answer, 0]
    assert tok.encode("two plus two?<think>so four</think> four<eos>") == seq
    seg = segment_ids(Ragged.from_rows([seq]), np.array([len(prompt)]), tags)
    assert seg.labels().tolist() == [0] * len(prompt) + [1] * (len(cot) + 2) + [2] * (len(answer) + 1)
    assert seg.flags.tolist() == [0]


# ---- property test against a character-level reference ---------------------------------------------------


def reference(seq: list[int], n_prompt: int) -> tuple[list[int], int]:
    """Labels and flags from the decoded text, by the module's rules, one example at a time."""
    pieces = [PIECES[i] for i in seq]
    starts = np.cumsum([0] + [len(p) for p in pieces]).tolist()
    text = "".join(pieces)

    def token_at(char: int) -> int:
        return max(i for i in range(len(pieces)) if starts[i] <= char)

    tags = []  # (first token, end token, is_close, merged)
    for tag, is_close in (("<think>", False), ("</think>", True)):
        q = text.find(tag)
        while q != -1:
            first, last = token_at(q), token_at(q + len(tag) - 1)
            tags.append((first, last + 1, is_close, starts[first] != q or starts[last + 1] != q + len(tag)))
            q = text.find(tag, q + 1)
    tags.sort()
    in_prompt = [t for t in tags if t[0] < n_prompt]
    comp = [t for t in tags if t[0] >= n_prompt]

    def only_space(lo: int, hi: int) -> bool:
        return 0 <= hi - lo <= MAX_SPACE_GAP and all(pieces[i].isspace() for i in range(lo, hi))

    prompt_opens = bool(in_prompt) and not in_prompt[-1][2] and only_space(in_prompt[-1][1], n_prompt)
    opens, closes = [t for t in comp if not t[2]], [t for t in comp if t[2]]
    opened = bool(opens) or prompt_opens
    answer = closes[-1][1] if closes else (len(seq) if opened else n_prompt)
    flags = F(0)
    flags |= F.NO_CLOSE_TAG if opened and not closes else 0
    flags |= F.NO_OPEN_TAG if closes and not opened else 0
    flags |= F.NO_THINK_TAGS if not opened and not closes else 0
    if closes:
        block = opens[0][1] if opens and opens[0][0] < closes[0][0] else n_prompt
        flags |= F.EMPTY_COT if only_space(block, closes[0][0]) else 0
    flags |= F.MULTIPLE_THINK_BLOCKS if len(opens) > 1 or len(closes) > 1 else 0
    flags |= F.TAG_IN_PROMPT if in_prompt else 0
    flags |= F.PROMPT_OPENS_THINK if prompt_opens else 0
    flags |= F.MERGED_TAG if any(t[3] for t in comp) else 0
    labels = [PROMPT] * n_prompt + [COT] * (answer - n_prompt) + [ANSWER] * (len(seq) - answer)
    return labels, int(flags)


# Random rows biased towards tag pieces so that every rule fires often.
TOKENS = st.sampled_from([1, 2, 4, 5, 6, 7, 8, 10, 11, 12, 12, 13, 13, 14, 15, 16])
ROWS = st.lists(st.tuples(st.lists(TOKENS, max_size=24), st.integers(0, 24)), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(ROWS)
def test_matches_character_reference(rows: list[tuple[list[int], int]]) -> None:
    seqs = [seq for seq, _ in rows]
    n_prompts = [min(p, len(seq)) for seq, p in rows]
    seg = segment_ids(Ragged.from_rows(seqs), np.array(n_prompts), MULTI)
    labels = Ragged(seg.labels(), seg.offsets).tolist()
    for i, (seq, n_prompt) in enumerate(zip(seqs, n_prompts, strict=True)):
        want_labels, want_flags = reference(seq, n_prompt)
        assert labels[i] == want_labels, (seq, n_prompt)
        assert int(seg.flags[i]) == want_flags, (seq, n_prompt, F(int(seg.flags[i])), F(want_flags))
        # P, CoT, A in this order, partitioning the row
        assert labels[i] == sorted(labels[i]) and labels[i].count(PROMPT) == n_prompt
