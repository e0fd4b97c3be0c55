"""Segmentation of token-id sequences into prompt (P), chain of thought (CoT) and answer (A).

Layout: a batch is ragged, one flat array of values plus `offsets` (n + 1,) int64, as in an Arrow list array
(what Parquet and Ray Data hand over); sequence i is `values[offsets[i]:offsets[i + 1]]`. A sequence is the
prompt's ids followed by the teacher's completion ids. Its segmentation is two boundaries per example:

    [0, prompt_end) PROMPT    [prompt_end, answer_start) COT    [answer_start, length) ANSWER

so labels always partition a sequence in the order P, CoT, A; any of the three may be empty.

Rules, each edge case setting a SegFlag bit (count them with `count_flags`):
- Tags are looked for in the completion. A tag in the prompt (TAG_IN_PROMPT) changes nothing, unless the
  prompt ends with an open tag followed by whitespace only: the chat template opened the think block
  (DeepSeek-R1, Qwen3-Thinking), PROMPT_OPENS_THINK, and the completion starts inside the CoT.
- CoT runs from the first generated token to the end of the last close tag, tags included; generated tokens
  before the open tag count as CoT. Everything after the last close tag is ANSWER, EOS included.
- NO_CLOSE_TAG: a think block was opened but never closed (the generation hit its token limit): the whole
  completion is CoT and the answer is empty.
- NO_OPEN_TAG: a close tag but no open tag anywhere: CoT from the first generated token to the end of the
  close tag.
- NO_THINK_TAGS: no tag at all: the whole completion is ANSWER and the CoT is empty.
- EMPTY_COT: the first think block holds only whitespace tokens; its tags and that whitespace still count as
  CoT.
- MULTIPLE_THINK_BLOCKS: more than one open or close tag: one CoT up to the last close tag, text between
  blocks included.
- MERGED_TAG: a tag's first or last token also carries neighbouring characters (the BPE merged " </" or
  ">."): the whole token belongs to the tag, so those characters count as CoT.

Tags are located on the ids, never by re-tokenizing text: ThinkTags keeps the decoded text of every
vocabulary token. In the canonical tokenization of a tag, its longest token (the "core": `think`, or the
whole tag when it is one special token as in Qwen3) stays intact, while the edge tokens may merge with
neighbours. One table lookup over all ids finds the tokens that can hold the core (vectorised); each such
candidate is confirmed by decoding the few tokens around it and finding the tag's text there. Tokens that are
exactly the tag need no confirmation. Not found: a core split into non-canonical pieces (`th` + `ink`),
which sampling rarely produces.

For text sources (trace datasets), `raykd.segments_text.segment_texts` finds the markers by character
offsets and maps them to tokens through the tokenizer's offset mapping.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntFlag
from typing import Any

import numpy as np

PROMPT, COT, ANSWER = 0, 1, 2
SEGMENTS: dict[str, int] = {"prompt": PROMPT, "cot": COT, "answer": ANSWER}
SEGMENT_NAMES = tuple(SEGMENTS)  # in code order: SEGMENT_NAMES[PROMPT] == "prompt"
# Whitespace tokens tolerated between an open and a close tag (empty CoT) or after a prompt's open tag.
MAX_SPACE_GAP = 8


class SegFlag(IntFlag):
    """Per-example edge-case bits (uint16 column); see the module docstring for each outcome."""

    NO_CLOSE_TAG = 1
    NO_OPEN_TAG = 2
    NO_THINK_TAGS = 4
    EMPTY_COT = 8
    MULTIPLE_THINK_BLOCKS = 16
    TAG_IN_PROMPT = 32
    PROMPT_OPENS_THINK = 64
    MERGED_TAG = 128


def count_flags(flags: np.ndarray) -> dict[str, int]:
    """Number of examples with each SegFlag bit set. flags: (n,) integer."""
    return {str(f.name).lower(): int(np.count_nonzero(flags & f.value)) for f in SegFlag}


@dataclass(frozen=True, eq=False)
class Ragged:
    """A batch of variable-length rows: values (total, ...) and offsets (n + 1,) int64."""

    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[int]], dtype: Any = np.int32) -> Ragged:
        lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        values = np.fromiter(itertools.chain.from_iterable(rows), dtype, int(offsets[-1]))
        return cls(values, offsets)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def tolist(self) -> list[list[Any]]:
        return [self.row(i).tolist() for i in range(len(self))]


@dataclass(frozen=True)
class _Tag:
    text: bytes
    core_lo: int  # the core token's byte span inside `text`
    core_hi: int


def _tag_from_ids(pieces: Sequence[bytes], ids: Sequence[int]) -> _Tag:
    parts = [pieces[i] for i in ids]
    core = max(range(len(parts)), key=lambda k: len(parts[k]))  # first longest token
    raw = b"".join(parts)
    text = raw.strip()  # a tokenizer may encode "<think>" as " <", "think", ">" (prefix space)
    if not text:
        raise ValueError(f"think tag ids {list(ids)} decode to whitespace only")
    lo = sum(len(p) for p in parts[:core]) - (len(raw) - len(raw.lstrip()))
    return _Tag(text, max(lo, 0), min(lo + len(parts[core]), len(text)))


def _covers_core(piece: bytes, tag: _Tag) -> bool:
    """True if `piece` can be the token holding the tag's whole core in some occurrence of the tag."""
    core = tag.text[tag.core_lo : tag.core_hi]
    k = piece.find(core)
    while k != -1:
        q = k - tag.core_lo  # where the tag would start, in piece coordinates
        lo, hi = max(0, q), min(len(piece), q + len(tag.text))
        if piece[lo:hi] == tag.text[lo - q : hi - q]:
            return True
        k = piece.find(core, k + 1)
    return False


_OPEN, _CLOSE, _EXACT_OPEN, _EXACT_CLOSE = 1, 2, 4, 8


class ThinkTags:
    """The open/close think tags of one vocabulary, and the tables to find them on ids.

    pieces: the decoded text of every token id (index = id). open_ids / close_ids: the canonical tokenization
    of each tag (one id for a special token). Build it from a Hugging Face tokenizer with `from_tokenizer`.
    """

    def __init__(
        self, pieces: Sequence[str | bytes], open_ids: Sequence[int], close_ids: Sequence[int]
    ) -> None:
        self.pieces = tuple(p.encode() if isinstance(p, str) else bytes(p) for p in pieces)
        self.open_ids, self.close_ids = tuple(open_ids), tuple(close_ids)
        if not self.open_ids or not self.close_ids:
            raise ValueError("think tags need at least one token each")
        self.open, self.close = _tag_from_ids(self.pieces, open_ids), _tag_from_ids(self.pieces, close_ids)
        if self.open.text in self.close.text or self.close.text in self.open.text:
            raise ValueError(f"tags {self.open.text!r} and {self.close.text!r} must not contain each other")
        # One extra False slot: ids beyond the vocabulary are clipped onto it.
        self.codes = np.zeros(len(self.pieces) + 1, np.uint8)
        for i, piece in enumerate(self.pieces):
            self.codes[i] = self._code(piece)
        self.is_space = np.zeros(len(self.pieces) + 1, bool)
        self.is_space[:-1] = [bool(p) and not p.strip() for p in self.pieces]

    def _code(self, piece: bytes) -> int:
        if piece == self.open.text:
            return _EXACT_OPEN
        if piece == self.close.text:
            return _EXACT_CLOSE
        core_open = self.open.text[self.open.core_lo : self.open.core_hi]
        core_close = self.close.text[self.close.core_lo : self.close.core_hi]
        code = _OPEN if core_open in piece and _covers_core(piece, self.open) else 0
        return code | (_CLOSE if core_close in piece and _covers_core(piece, self.close) else 0)

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, open_text: str = "<think>", close_text: str = "</think>"
    ) -> ThinkTags:
        """Tags as the tokenizer writes them (special tokens included, no BOS added)."""
        size = len(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            pieces = backend.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
        else:
            pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in range(size)]
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        return cls(pieces, encode(open_text), encode(close_text))

    @property
    def texts(self) -> tuple[str, str]:
        return self.open.text.decode(), self.close.text.decode()


@dataclass(frozen=True, eq=False)
class _Matches:
    """Tag occurrences, sorted by start; positions are flat indices into the batch."""

    start: np.ndarray
    end: np.ndarray
    is_close: np.ndarray
    merged: np.ndarray


def _confirm(ids: np.ndarray, lo: int, hi: int, c: int, tag: _Tag, pieces: tuple[bytes, ...]) -> tuple | None:
    """The tag whose core lies in token c, decoding tokens [lo, hi) only: (start, end, merged) or None."""
    window = [pieces[i] if i < len(pieces) else b"" for i in ids[lo:hi].tolist()]
    starts = list(itertools.accumulate(map(len, window), initial=0))
    buf, j = b"".join(window), c - lo
    q = buf.find(tag.text)
    while q != -1:
        if starts[j] <= q + tag.core_lo and q + tag.core_hi <= starts[j + 1]:
            first = bisect.bisect_right(starts, q) - 1
            last = bisect.bisect_right(starts, q + len(tag.text) - 1) - 1
            merged = starts[first] != q or starts[last + 1] != q + len(tag.text)
            return lo + first, lo + last + 1, merged
        q = buf.find(tag.text, q + 1)
    return None


def _find_tags(ids: np.ndarray, offsets: np.ndarray, tags: ThinkTags) -> _Matches:
    code = np.take(tags.codes, ids, mode="clip")
    cand = np.flatnonzero(code)
    cand_code = code[cand]
    exact = (cand_code & (_EXACT_OPEN | _EXACT_CLOSE)) != 0
    start, close = [cand[exact]], [(cand_code[exact] & _EXACT_CLOSE) != 0]
    end, merged = [cand[exact] + 1], [np.zeros(int(exact.sum()), bool)]
    rest = cand[~exact]
    found: list[tuple] = []
    if rest.size:  # a few candidates per sequence: confirm them one by one
        ex = np.searchsorted(offsets, rest, side="right") - 1
        for c, e, cc in zip(rest.tolist(), ex.tolist(), cand_code[~exact].tolist(), strict=True):
            for bit, tag in ((_OPEN, tags.open), (_CLOSE, tags.close)):
                if cc & bit:
                    width = len(tag.text) + 2
                    lo, hi = max(int(offsets[e]), c - width), min(int(offsets[e + 1]), c + width + 1)
                    hit = _confirm(ids, lo, hi, c, tag, tags.pieces)
                    if hit is not None:
                        found.append((hit[0], hit[1], bit == _CLOSE, hit[2]))
    if found:
        cols = list(zip(*found, strict=True))
        start.append(np.array(cols[0], np.int64))
        end.append(np.array(cols[1], np.int64))
        close.append(np.array(cols[2], bool))
        merged.append(np.array(cols[3], bool))
    start_a = np.concatenate(start).astype(np.int64)
    order = np.argsort(start_a, kind="stable")
    return _Matches(
        start_a[order],
        np.concatenate(end)[order],
        np.concatenate(close)[order],
        np.concatenate(merged)[order],
    )


@dataclass(frozen=True, eq=False)
class TagStats:
    """Per-example tag facts, positions relative to the sequence start (-1: none)."""

    n_open: np.ndarray
    n_close: np.ndarray
    last_close_start: np.ndarray
    last_close_end: np.ndarray
    tag_in_prompt: np.ndarray
    prompt_opens: np.ndarray
    empty_cot: np.ndarray
    merged: np.ndarray


def _pick(n: int, ex: np.ndarray, values: np.ndarray, sel: np.ndarray, last: bool = False) -> np.ndarray:
    """(n,) value of the first (or last) selected match of each example, -1 where none. ex: sorted."""
    ex, values = ex[sel], values[sel]
    out = np.full(n, -1, np.int64)
    if ex.size:
        change = ex[1:] != ex[:-1]
        edge = np.r_[change, True] if last else np.r_[True, change]
        out[ex[edge]] = values[edge]
    return out


def _only_space(
    ids: np.ndarray,
    offsets: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    is_space: np.ndarray,
    where: np.ndarray,
) -> np.ndarray:
    """(n,) bool: where & tokens [lo, hi) of each sequence are at most MAX_SPACE_GAP whitespace tokens."""
    gap = hi - lo
    ok = where & (gap >= 0) & (gap <= MAX_SPACE_GAP)
    for j in range(MAX_SPACE_GAP):
        need = ok & (j < gap)
        if not need.any():
            break
        ok[need] &= np.take(is_space, ids[offsets[:-1][need] + lo[need] + j], mode="clip")
    return ok


def _tag_stats(ids: np.ndarray, offsets: np.ndarray, prompt_ends: np.ndarray, tags: ThinkTags) -> TagStats:
    m, n = _find_tags(ids, offsets, tags), len(offsets) - 1
    ex = np.searchsorted(offsets, m.start, side="right") - 1
    start, end, close = m.start - offsets[ex], m.end - offsets[ex], m.is_close
    in_prompt = start < prompt_ends[ex]
    comp = ~in_prompt
    # The template opened the think block if the prompt's last tag is an open tag followed by whitespace only.
    last_prompt_end = _pick(n, ex, end, in_prompt, last=True)
    last_prompt_open = _pick(n, ex, (~close).astype(np.int64), in_prompt, last=True) == 1
    prompt_opens = _only_space(ids, offsets, last_prompt_end, prompt_ends, tags.is_space, last_prompt_open)
    first_close = _pick(n, ex, start, comp & close)
    first_open, first_open_end = _pick(n, ex, start, comp & ~close), _pick(n, ex, end, comp & ~close)
    # The first block's content starts after its open tag, or at the first generated token without one.
    open_first = (first_open >= 0) & ((first_close < 0) | (first_open < first_close))
    block = np.where(open_first, first_open_end, prompt_ends)
    counts = lambda sel: np.bincount(ex[sel], minlength=n)  # noqa: E731
    return TagStats(
        n_open=counts(comp & ~close),
        n_close=counts(comp & close),
        last_close_start=_pick(n, ex, start, comp & close, last=True),
        last_close_end=_pick(n, ex, end, comp & close, last=True),
        tag_in_prompt=counts(in_prompt) > 0,
        prompt_opens=prompt_opens,
        empty_cot=_only_space(ids, offsets, block, first_close, tags.is_space, first_close >= 0),
        merged=counts(comp & m.merged) > 0,
    )


@dataclass(frozen=True, eq=False)
class Segmentation:
    """Segment boundaries of a ragged batch; positions are relative to each sequence's start.

    offsets: (n + 1,) int64 into the flat token array. prompt_ends: (n,) first CoT position (the prompt
    length). close_starts: (n,) first token of the last close tag, -1 when none. answer_starts: (n,) first
    ANSWER position (= length when there is no answer). flags: (n,) uint16 SegFlag bits.
    """

    offsets: np.ndarray
    prompt_ends: np.ndarray
    close_starts: np.ndarray
    answer_starts: np.ndarray
    flags: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def segment_lengths(self) -> np.ndarray:
        """(n, 3) int64 tokens in P, CoT, A."""
        pe, ans = self.prompt_ends, self.answer_starts
        return np.stack([pe, ans - pe, self.lengths - ans], axis=1)

    def labels(self) -> np.ndarray:
        """(total,) int8 segment id of every token."""
        return segment_labels(self.segment_lengths())

    def counts(self) -> dict[str, int]:
        return {"examples": len(self.prompt_ends), **count_flags(self.flags)}


def segment_labels(segment_lengths: np.ndarray) -> np.ndarray:
    """Flat int8 labels from per-example segment lengths. segment_lengths: (n, 3) tokens in P, CoT, A."""
    codes = np.tile(np.array([PROMPT, COT, ANSWER], np.int8), len(segment_lengths))
    return np.repeat(codes, segment_lengths.reshape(-1))


def decide(stats: TagStats, offsets: np.ndarray, prompt_ends: np.ndarray) -> Segmentation:
    """Apply the module's rules to per-example tag facts."""
    lengths = np.diff(offsets)
    has_open, has_close = stats.n_open > 0, stats.n_close > 0
    opened = has_open | stats.prompt_opens
    answer = np.where(has_close, stats.last_close_end, np.where(opened, lengths, prompt_ends))
    bits = [
        (SegFlag.NO_CLOSE_TAG, opened & ~has_close),
        (SegFlag.NO_OPEN_TAG, has_close & ~opened),
        (SegFlag.NO_THINK_TAGS, ~opened & ~has_close),
        (SegFlag.EMPTY_COT, stats.empty_cot & has_close),
        (SegFlag.MULTIPLE_THINK_BLOCKS, (stats.n_open > 1) | (stats.n_close > 1)),
        (SegFlag.TAG_IN_PROMPT, stats.tag_in_prompt),
        (SegFlag.PROMPT_OPENS_THINK, stats.prompt_opens),
        (SegFlag.MERGED_TAG, stats.merged),
    ]
    flags = np.zeros(len(lengths), np.uint16)
    for flag, where in bits:
        flags[where] |= np.uint16(flag.value)
    close = np.where(has_close, stats.last_close_start, -1)
    return Segmentation(
        offsets.astype(np.int64),
        prompt_ends.astype(np.int64),
        close.astype(np.int64),
        answer.astype(np.int64),
        flags,
    )


def segment_ids(seqs: Ragged, prompt_lens: np.ndarray, tags: ThinkTags) -> Segmentation:
    """Segment a batch of full sequences (prompt ids + completion ids) by locating the think tags on the ids.

    seqs: ragged (total,) token ids; prompt_lens: (n,) number of prompt tokens at the start of each sequence.
    """
    prompt_lens = np.asarray(prompt_lens, np.int64)
    if np.any(prompt_lens < 0) or np.any(prompt_lens > seqs.lengths):
        raise ValueError("prompt_lens must lie in [0, length] for every sequence")
    return decide(_tag_stats(seqs.values, seqs.offsets, prompt_lens, tags), seqs.offsets, prompt_lens)
