"""From trace rows to training examples: what one training worker keeps of each trace.

Pure numpy (no torch, Ray or DeepSpeed). `prepare_examples` cuts each trace (prompt ids + completion ids, the
agreed Parquet schema) to the trial's keep window (`raykd.truncation`), labels it on the trial's segments,
optionally random-label-masks it, and reduces it to what training needs: the forwarded ids, the input
positions whose next-token prediction is supervised, the target ids, their segment ids and the teacher's
cached top-k rows for those targets only. Tokens after the last supervised target are dropped from the
forward pass too: in a causal model they change no supervised logit (a `[cot]` mask at f = 1 never runs the
answer). Examples left with no supervised token are dropped and counted. `load_shard` does it for a worker's
whole Ray Data shard; `raykd.kd.batching` then plans the epochs and pads the micro-batches.

Position convention: the logits at input position t predict token t + 1, so target token j of a kept window
is predicted from position j - 1, and the first kept token is never a target.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from raykd import truncation
from raykd.segments import ANSWER, PROMPT, SEGMENT_NAMES, Ragged, Segmentation

if TYPE_CHECKING:
    from raykd.plan import TrialConfig

# Columns of the trace schema that training reads (the rest, e.g. texts, never leave the Parquet files).
TRAIN_COLUMNS = (
    "problem_id",
    "sample_index",
    "prompt_ids",
    "completion_ids",
    "segments",
    "k",
    "topk_ids",
    "topk_logprobs",
    "prompt_topk_ids",
    "prompt_topk_logprobs",
)


@dataclass(frozen=True)
class TrialData:
    """How one trial cuts and labels its traces. The values were validated with the spec (its
    training.truncation_policy, sweep.truncation and sweep.segments rules), so none is checked again here;
    `raykd.truncation` refuses an unknown policy where it is used."""

    fraction: float = 1.0
    truncation_policy: str = "lead_span"
    segments: tuple[str, ...] = SEGMENT_NAMES
    random_label_mask: float = 0.0
    seed: int = 0

    @classmethod
    def of(cls, cfg: TrialConfig) -> TrialData:
        """A trial's grid point and truncation settings."""
        t = cfg.training
        return cls(cfg.fraction, t.truncation_policy, cfg.segments, t.random_label_mask, cfg.seed)


@dataclass(frozen=True, eq=False)
class Example:
    """One trace after truncation and masking.

    input_ids: (n,) int32 forwarded tokens; target_pos: (t,) int32 input positions whose prediction is
    supervised (strictly increasing, the last one is n - 1); target_ids: (t,) int32; segment: (t,) int8;
    topk_ids: (t, k) int32 and topk_logprobs: (t, k) float32 the teacher's rows for those targets;
    has_teacher: (t,) bool, False for prompt targets when the traces hold no prompt logprobs.
    kept_tokens: tokens the truncation kept (before the trailing unsupervised ones were dropped);
    full_tokens: the trace's whole length.
    """

    key: str
    input_ids: np.ndarray
    target_pos: np.ndarray
    target_ids: np.ndarray
    segment: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    has_teacher: np.ndarray
    kept_tokens: int
    full_tokens: int

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PrepStats:
    """What preparation kept and dropped, summed over the batches of a shard."""

    sequences: int = 0  # rows read
    kept_sequences: int = 0  # rows with at least one supervised token, trained on
    unsupervised_sequences: int = 0  # rows left with no supervised token after truncation and masking
    budget_dropped: int = 0  # rows left out by the budget_matched control
    full_tokens: int = 0
    kept_tokens: int = 0  # after truncation, rows trained on
    forward_tokens: int = 0  # after dropping tokens past the last target
    supervised_tokens: int = 0
    supervised_per_segment: list[int] = field(default_factory=lambda: [0] * len(SEGMENT_NAMES))
    no_teacher_targets: int = 0

    def add(self, other: PrepStats) -> None:
        for name, value in vars(other).items():
            if isinstance(value, list):
                setattr(self, name, [a + b for a, b in zip(getattr(self, name), value, strict=True)])
            else:
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        out = {k: v for k, v in vars(self).items() if not isinstance(v, list)}
        for code, name in enumerate(SEGMENT_NAMES):
            out[f"supervised_{name}"] = self.supervised_per_segment[code]
        return out


# ------------------------------------------------------------------------------------------ rows -> arrays


def ragged(column: Any, dtype: Any) -> Ragged:
    """A list column (Arrow/Ray Data numpy batch: object array of arrays, or a list of lists) as Ragged."""
    rows = [np.asarray(r, dtype) for r in column]
    lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(rows) if rows else np.zeros(0, dtype)
    return Ragged(values.astype(dtype, copy=False), offsets)


def segmentation_from_labels(labels: Ragged) -> Segmentation:
    """The P / CoT / A boundaries of per-token segment labels (the trace's `segments` column)."""
    n = len(labels)
    row = np.repeat(np.arange(n), labels.lengths)
    prompt_ends = np.bincount(row, weights=labels.values == PROMPT, minlength=n).astype(np.int64)
    answers = np.bincount(row, weights=labels.values == ANSWER, minlength=n).astype(np.int64)
    # The close tag's position is not in the labels; only truncation metadata (not used here) reads it.
    close = np.full(n, -1, np.int64)
    return Segmentation(labels.offsets, prompt_ends, close, labels.lengths - answers, np.zeros(n, np.uint16))


def _keys(rows: Mapping[str, Any], n: int) -> list[str]:
    if "problem_id" not in rows:
        return [f"row{i}" for i in range(n)]
    samples = rows.get("sample_index", np.zeros(n, np.int64))
    return [f"{p}#{int(s)}" for p, s in zip(rows["problem_id"], samples, strict=True)]


def _example_seed(seed: int, key: str) -> int:
    """A per-example seed independent of how rows were batched (Ray Data gives no order guarantee)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "little")


def _topk_width(rows: Mapping[str, Any]) -> int:
    """The traces' top-k width; 0 for traces without cached logprobs (an online teacher then supplies KD)."""
    if "k" not in rows or "topk_ids" not in rows:
        return 0
    ks = np.unique(np.asarray(rows["k"], np.int64))
    if len(ks) != 1:
        raise ValueError(f"traces mix top-k widths {ks.tolist()}; write every trace with the same logprobs_k")
    return int(ks[0])


def _teacher_rows(
    rows: Mapping[str, Any], k: int, n: int, prompt_lens: np.ndarray, completion_lens: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-k rows stacked per example: completion rows first, then the prompt rows (when captured).

    Returns ids (rows, k), logprobs (rows, k), completion row offsets (n + 1,), prompt row offsets (n + 1,),
    has_prompt (n,) bool. Prompt row i of an example is the distribution of its prompt token i + 1.
    """
    if k == 0:  # no cached rows: one empty placeholder row that every target points at
        zeros = np.zeros(n + 1, np.int64)
        return np.zeros((1, 0), np.int32), np.zeros((1, 0), np.float32), zeros, zeros, np.zeros(n, bool)
    ids = ragged(rows["topk_ids"], np.int32)
    lps = ragged(rows["topk_logprobs"], np.float32)
    if not np.array_equal(ids.lengths, completion_lens * k) or not np.array_equal(lps.lengths, ids.lengths):
        raise ValueError("topk_ids / topk_logprobs must hold len(completion_ids) * k values per trace")
    has_prompt = np.zeros(n, bool)
    p_ids = p_lps = None
    if "prompt_topk_ids" in rows and rows["prompt_topk_ids"] is not None:
        p_ids = ragged(rows["prompt_topk_ids"], np.int32)
        p_lps = ragged(rows["prompt_topk_logprobs"], np.float32)
        has_prompt = p_ids.lengths > 0
        want = np.maximum(prompt_lens - 1, 0) * k
        if np.any(p_ids.lengths[has_prompt] != want[has_prompt]) or not np.array_equal(
            p_ids.lengths, p_lps.lengths
        ):
            raise ValueError(
                "prompt_topk_ids / prompt_topk_logprobs must hold (len(prompt_ids) - 1) * k values or none"
            )
    comp_off = ids.offsets // k
    prompt_rows = np.where(has_prompt, np.maximum(prompt_lens - 1, 0), 0)
    prompt_off = comp_off[-1] + np.concatenate([[0], np.cumsum(prompt_rows)])
    all_ids, all_lps = [ids.values], [lps.values]
    if p_ids is not None:
        all_ids.append(p_ids.values)
        all_lps.append(p_lps.values)
    return (
        np.concatenate(all_ids).reshape(-1, k),
        np.concatenate(all_lps).reshape(-1, k),
        comp_off,
        prompt_off,
        has_prompt,
    )


def _windows(trial: TrialData, seg: Segmentation) -> truncation.Windows:
    return truncation.make_windows(trial.truncation_policy, seg, trial.fraction)


def prepare_examples(rows: Mapping[str, Any], trial: TrialData) -> tuple[list[Example], PrepStats]:
    """Truncate, label and slice one batch of trace rows (columns as in the agreed schema).

    Returns the examples with at least one supervised token, in row order, and the counts. The budget_matched
    control keeps full sequences here; `select_budget` picks which ones afterwards, over the whole shard.
    """
    prompts = ragged(rows["prompt_ids"], np.int32)
    completions = ragged(rows["completion_ids"], np.int32)
    n = len(prompts)
    stats = PrepStats(sequences=n)
    if n == 0:
        return [], stats
    labels = ragged(rows["segments"], np.int8)
    full_lens = prompts.lengths + completions.lengths
    if not np.array_equal(labels.lengths, full_lens):
        raise ValueError("segments must hold one label per token of prompt_ids + completion_ids")
    seqs = _concat_rows(prompts, completions)
    seg = segmentation_from_labels(labels)
    windows = _windows(trial, seg)
    cut = truncation.truncate_batch(seqs, seg, windows, trial.segments)
    keys = _keys(rows, n)
    k = _topk_width(rows)
    teacher = _teacher_rows(rows, k, n, prompts.lengths, completions.lengths)
    out = []
    for i in range(n):
        example = _example(i, keys[i], cut, windows, prompts.lengths[i], full_lens[i], teacher, trial)
        stats.full_tokens += int(full_lens[i])
        if example is None:
            stats.unsupervised_sequences += 1
            continue
        out.append(example)
        _count(stats, example)
    return out, stats


def _concat_rows(a: Ragged, b: Ragged) -> Ragged:
    """Row i = a[i] followed by b[i]."""
    lengths = a.lengths + b.lengths
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.empty(offsets[-1], a.values.dtype)
    in_a = (
        np.repeat(offsets[:-1], a.lengths) + np.arange(len(a.values)) - np.repeat(a.offsets[:-1], a.lengths)
    )
    in_b = (
        np.repeat(offsets[:-1] + a.lengths, b.lengths)
        + np.arange(len(b.values))
        - np.repeat(b.offsets[:-1], b.lengths)
    )
    values[in_a] = a.values
    values[in_b] = b.values
    return Ragged(values, offsets)


def _example(
    i: int,
    key: str,
    cut: truncation.TruncatedBatch,
    windows: truncation.Windows,
    prompt_len: int,
    full_len: int,
    teacher: tuple,
    trial: TrialData,
) -> Example | None:
    lo, hi = cut.ids.offsets[i], cut.ids.offsets[i + 1]
    mask = cut.mask[lo:hi]
    if trial.random_label_mask > 0:
        mask = truncation.random_label_mask(mask, trial.random_label_mask, _example_seed(trial.seed, key))
    targets = np.flatnonzero(mask)  # kept-window indices t >= 1 of supervised tokens
    if len(targets) == 0:
        return None
    ids = cut.ids.values[lo:hi]
    # The random label control must not save compute: trim by the segment mask, before label dropping.
    last = int(np.flatnonzero(cut.mask[lo:hi])[-1])
    j = int(windows.starts[i]) + targets  # positions in the full sequence
    topk_ids, topk_lps, comp_off, prompt_off, has_prompt = teacher
    in_completion = j >= prompt_len
    has_teacher = (in_completion | bool(has_prompt[i])) & (topk_ids.shape[1] > 0)
    row = np.where(in_completion, comp_off[i] + j - prompt_len, prompt_off[i] + j - 1)
    row = np.where(has_teacher, row, 0)  # any valid row; masked out by has_teacher
    return Example(
        key=key,
        input_ids=ids[:last].astype(np.int32),
        target_pos=(targets - 1).astype(np.int32),
        target_ids=ids[targets].astype(np.int32),
        segment=cut.labels.values[lo:hi][targets].astype(np.int8),
        topk_ids=topk_ids[row],
        topk_logprobs=topk_lps[row],
        has_teacher=has_teacher,
        kept_tokens=int(hi - lo),
        full_tokens=int(full_len),
    )


def _count(stats: PrepStats, ex: Example) -> None:
    stats.kept_sequences += 1
    stats.kept_tokens += ex.kept_tokens
    stats.forward_tokens += len(ex.input_ids)
    stats.supervised_tokens += len(ex.target_ids)
    per = np.bincount(ex.segment, minlength=len(SEGMENT_NAMES)) + np.asarray(stats.supervised_per_segment)
    stats.supervised_per_segment = [int(v) for v in per]
    stats.no_teacher_targets += int(np.count_nonzero(~ex.has_teacher))


def select_budget(examples: list[Example], trial: TrialData) -> tuple[list[Example], int]:
    """The budget_matched control over a shard: full-length examples within the lead-span token budget.

    Call it on the shard in `sort_by_key` order (the selection is seeded). Other policies return the examples
    unchanged. Returns (kept examples in their original order, number dropped).
    """
    if trial.truncation_policy != "budget_matched":
        return examples, 0
    full = np.fromiter((e.full_tokens for e in examples), np.int64, len(examples))
    chosen = np.sort(truncation.budget_matched(full, trial.fraction, trial.seed))
    return [examples[i] for i in chosen], len(examples) - len(chosen)


def sort_by_key(examples: list[Example]) -> list[Example]:
    """A shard's examples in a fixed order, whatever order the rows arrived in."""
    return sorted(examples, key=lambda e: e.key)


def load_shard(shard: Any, trial: TrialData, batch_size: int = 256) -> tuple[list[Example], PrepStats]:
    """Read, truncate and label a worker's shard (Ray DataIterator), sorted by key, budget control applied."""
    examples: list[Example] = []
    stats = PrepStats()
    for rows in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        part, part_stats = prepare_examples(rows, trial)
        examples.extend(part)
        stats.add(part_stats)
    examples, stats.budget_dropped = select_budget(sort_by_key(examples), trial)
    return examples, stats


def shard_digest(examples: list[Example]) -> str:
    """Names a shard's traces, to tell on a resume whether a worker got the same ones again."""
    return hashlib.sha256("\n".join(e.key for e in examples).encode()).hexdigest()[:16]
