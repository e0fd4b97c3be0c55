"""Teacher signals: what the KD loss compares the student with, and the top-k bucket arithmetic.

Pure torch (no Ray, DeepSpeed or vLLM).
    TopKTeacher       (default) the teacher's cached top-k log-probs per position as vLLM reports them
                      (over the full vocabulary, temperature 1). The mass outside the top-k is ONE tail
                      bucket, so the divergence runs over k + 1 buckets: teacher tail =
                      1 - sum(exp(topk_logprobs)); student tail = its probability off those k ids, computed
                      as a sum of positive terms (exact however small). The teacher tail is floored at
                      TAIL_FLOOR and the buckets renormalised, because float32 logprobs near 0 can sum to
                      >= 1 while a softmax never gives an exact 0; with k = vocab the tail is empty (0).
                      The teacher's top-k mass (sum of its top-k probs) is returned for logging.
                      Entries past the student's rows (a padded teacher's top-k, `shared_rows`) are dropped
                      and the rest renormalised over the shared rows, as the online teachers compare them.
    FullVocabTeacher  online teacher logits (tokens, vocab): exact full-vocabulary divergence.
    TeacherHead       online teacher final hidden states + its lm_head: as FullVocabTeacher, but the
                      teacher's logits are also made one chunk at a time.

Temperature T (KD only): with the full vocabulary both distributions are softmax(logits / T), exact. With
the top-k, the teacher's tail at T != 1 cannot be known from its top-k (it sums many unseen tokens), so T
reshapes the distribution *within* the top-k and the tail bucket keeps its T = 1 mass, for both models:
bucket_i = (1 - tail) * softmax(topk_logits / T)_i, bucket_tail = tail. It is the same map for teacher and
student (equal models still give 0), exact at T = 1, and with k = vocab it equals the full-vocabulary
tempering. It is an approximation of tempered KD whenever T != 1 and k < vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

TAIL_FLOOR = 1e-8  # smallest teacher tail mass when k < vocab


def upcast(x: Tensor) -> Tensor:
    """float16/bfloat16 -> float32 for softmax math; float32 and float64 stay (float64 for exact tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@dataclass(frozen=True)
class TopKTeacher:
    """Cached teacher. ids: (tokens, k) int, distinct per row; logprobs: (tokens, k), full vocab, T = 1.

    keep: (tokens, k) bool, or None for all: entries left out of the buckets (`shared_rows` builds them:
    such an entry repeats a kept id of its row, with log-prob -inf). Every row keeps at least one entry.
    """

    ids: Tensor
    logprobs: Tensor
    keep: Tensor | None = None

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, start: int, stop: int) -> TopKTeacher:
        return self.select(slice(start, stop))

    def select(self, index: slice | Tensor) -> TopKTeacher:
        """The teacher at some positions (a slice or an index tensor)."""
        keep = None if self.keep is None else self.keep[index]
        return TopKTeacher(self.ids[index], self.logprobs[index], keep)

    def complete(self, vocab: int) -> bool:
        """Whether the entries cover all ``vocab`` ids (no tail). A dropped entry means fewer kept ids than
        the shared rows (some id was past them), so never complete."""
        return self.keep is None and self.ids.shape[-1] >= vocab


@dataclass(frozen=True)
class Dropped:
    """What `shared_rows` left out, per position. entries: (tokens,) int, top-k entries past the rows;
    mass: (tokens,) the teacher's probability on them; empty: (tokens,) bool, True where none is left."""

    entries: Tensor
    mass: Tensor
    empty: Tensor


def shared_rows(teacher: TopKTeacher, rows: int) -> tuple[TopKTeacher, Dropped]:
    """The cached teacher over the student's vocabulary rows 0..rows-1 only.

    Ids >= rows are a padded teacher's extra embedding rows: ids its tokenizer cannot emit (the driver saw
    that every id it can emit is below the student's rows, `raykd.traces.checks.check_vocabulary`), which
    vLLM still ranks (its log-probs run over every row) and which an untrained padding row can put in the
    top-k. The student has no such row, so those entries leave the buckets, and the kept ones are
    renormalised by the teacher's mass on the shared rows: log p - log(1 - dropped mass), the teacher
    conditioned on a shared token, as the online KD compares the two models over their shared rows
    (`raykd.kd.model.shared_vocabulary`). Padding mass outside the top-k cannot be seen and stays in the
    tail (each such id has at most the smallest top-k probability). The shared mass is floored at the kept
    mass (float16 log-probs can round 1 - dropped below it). Positions with no entry left have no teacher
    signal over the shared rows (Dropped.empty; the caller trains them on CE only) and keep their entries
    as they were (the loss refuses ids past its rows). Returns the teacher unchanged when nothing is past
    the rows.
    """
    outside = teacher.ids >= rows
    empty = outside.all(-1) & (outside.shape[-1] > 0)
    lp = upcast(teacher.logprobs)
    dropped = Dropped(outside.sum(-1), torch.where(outside, lp.exp(), 0.0).sum(-1), empty)
    if not bool(outside.any()):
        return teacher, dropped
    keep = ~outside | empty[:, None]  # rows with nothing left stay whole: the caller leaves them out
    log_dropped = torch.where(keep, -math.inf, lp).logsumexp(-1, keepdim=True)
    log_kept = torch.where(keep, lp, -math.inf).logsumexp(-1, keepdim=True)
    log_shared = torch.maximum(torch.log(-torch.expm1(log_dropped)), log_kept)
    logprobs = torch.where(keep, lp - log_shared, -math.inf)
    # A dropped entry points at its row's first kept id: in range for gather/scatter, and adds no bucket.
    first_kept = teacher.ids.gather(-1, keep.int().argmax(-1, keepdim=True))
    ids = torch.where(keep, teacher.ids, first_kept)
    return TopKTeacher(ids, logprobs, keep), dropped


@dataclass(frozen=True)
class FullVocabTeacher:
    """Online teacher: logits: (tokens, vocab) at the supervised positions."""

    logits: Tensor

    def __len__(self) -> int:
        return self.logits.shape[0]

    def rows(self, start: int, stop: int) -> FullVocabTeacher:
        return FullVocabTeacher(self.logits[start:stop])

    def full_logits(self) -> Tensor:
        """(tokens, vocab) in float32 or wider, no grad."""
        return upcast(self.logits.detach())


@dataclass(frozen=True)
class TeacherHead:
    """Online teacher, logits made per chunk. hidden: (tokens, d_teacher); weight: (vocab, d_teacher)."""

    hidden: Tensor
    weight: Tensor

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def rows(self, start: int, stop: int) -> TeacherHead:
        return TeacherHead(self.hidden[start:stop], self.weight)

    def full_logits(self) -> Tensor:
        """(tokens, vocab) in float32 or wider, no grad."""
        with torch.no_grad():
            return upcast(self.hidden @ self.weight.T)


Teacher = TopKTeacher | FullVocabTeacher | TeacherHead


def teacher_topk_logprobs(
    topk_logprobs: Tensor,
    vocab_size: int,
    temperature: float = 1.0,
    tail_floor: float = TAIL_FLOOR,
    complete: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Teacher log-probs over k + 1 buckets (the k ids, then the tail) and its reported top-k mass.

    topk_logprobs: (tokens, k), -inf at entries left out -> buckets (tokens, k + 1), topk_mass (tokens,).
    complete: whether the entries cover the vocabulary (default: k >= vocab_size; TopKTeacher.complete).
    """
    logprobs = upcast(topk_logprobs.detach())
    lse = logprobs.logsumexp(-1)
    if logprobs.shape[-1] >= vocab_size if complete is None else complete:
        log_top, log_tail = torch.zeros_like(lse), torch.full_like(lse, -math.inf)
    else:
        tail = (-torch.expm1(lse)).clamp(min=tail_floor)  # 1 - sum(p), without cancellation near sum = 0
        log_top, log_tail = torch.log1p(-tail), tail.log()
    top = log_top[:, None] + F.log_softmax(logprobs / temperature, -1)
    return torch.cat([top, log_tail[:, None]], -1), lse.exp().clamp(max=1.0)


def student_buckets(
    selected: Tensor, lse_rest: Tensor, temperature: float, keep: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Student log-probs over k + 1 buckets, from its logits at the k ids and the log-sum-exp of all others.

    selected: (tokens, k); lse_rest: (tokens,), -inf when the k ids are the whole vocabulary; keep:
    (tokens, k) bool or None (TopKTeacher.keep): an entry left out is an empty bucket (its id is a kept one)
    -> buckets (tokens, k + 1), log-partition over the full vocabulary (tokens,)
    """
    if keep is not None:
        selected = torch.where(keep, selected, -math.inf)  # no gradient reaches a left-out entry
    lse_top = selected.logsumexp(-1)
    lse_all = torch.logaddexp(lse_top, lse_rest)
    top = (lse_top - lse_all)[:, None] + F.log_softmax(selected / temperature, -1)
    return torch.cat([top, (lse_rest - lse_all)[:, None]], -1), lse_all


def topk_stats(logits: Tensor, ids: Tensor, complete: bool | None = None) -> tuple[Tensor, Tensor]:
    """Logits at the ids and log-sum-exp of the rest. logits: (t, vocab), ids: (t, k) -> (t, k), (t,)

    complete: whether the ids cover the vocabulary (default: k >= vocab; ids may repeat, TopKTeacher.keep).
    """
    selected = logits.gather(-1, ids)
    if ids.shape[-1] >= logits.shape[-1] if complete is None else complete:
        # An empty complement: a constant, since logsumexp over all -inf has a NaN gradient.
        return selected, logits.new_full(logits.shape[:1], -math.inf)
    return selected, logits.scatter(-1, ids, -math.inf).logsumexp(-1)


def student_topk_logprobs(
    student_logits: Tensor, ids: Tensor, temperature: float = 1.0, keep: Tensor | None = None
) -> Tensor:
    """Student log-probs over the teacher's k + 1 buckets.

    student_logits: (tokens, vocab); ids: (tokens, k); keep: (tokens, k) bool or None -> (tokens, k + 1)
    """
    complete = None if keep is None else False
    stats = topk_stats(upcast(student_logits), ids.long(), complete)
    return student_buckets(*stats, temperature, keep)[0]
