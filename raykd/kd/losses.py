"""Cross-entropy and knowledge-distillation losses between teacher and student next-token distributions.

Pure torch (no Ray, DeepSpeed or vLLM). The training loss is `(1 - λ) * CE + λ * KD`, summed over the
supervised positions, with the spec's loss settings (`raykd.spec.LossSpec`: divergence, kd_weight = λ,
temperature, jsd_beta, skew_alpha); λ = 0.5, forward KL and temperature 1 are the paper's setting. The
divergences are in `raykd.kd.divergences`, the teacher signals and their top-k buckets in `raykd.kd.teachers`.
CE is always at T = 1; no T^2 factor on KD, as in TRL and torchtune.

Memory: `chunked_kd_loss` takes the student's final hidden states at the supervised positions only and
runs the vocabulary projection and the loss in chunks of positions inside one autograd Function that
computes each chunk's gradient during its forward pass (as Liger's fused linear losses do). Only one
chunk's (chunk, vocab) float32 logits exist at a time, and nothing of size (tokens, vocab) is kept for
backward. The top-k path even reuses that one buffer for the gradient: its cost is one (chunk, vocab)
buffer plus a float32 (vocab, d) accumulator for the lm_head gradient, whatever the number of tokens.
`token_losses` is the plain, unchunked reference on full student logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from raykd.kd.divergences import divergence
from raykd.kd.teachers import (
    FullVocabTeacher,
    Teacher,
    TeacherHead,
    TopKTeacher,
    student_buckets,
    teacher_topk_logprobs,
    topk_stats,
    upcast,
)
from raykd.segments import SEGMENT_NAMES
from raykd.spec import LossSpec

NUM_SEGMENTS = len(SEGMENT_NAMES)  # segment ids PROMPT, COT, ANSWER (raykd.segments)
CHUNK_SIZE = 1024  # positions per vocabulary-projection chunk


@dataclass(frozen=True)
class TokenLosses:
    """Per-position losses. ce, kd, topk_mass: (tokens,) each; topk_mass is 1 for a full-vocab teacher."""

    ce: Tensor
    kd: Tensor
    topk_mass: Tensor

    def detach(self) -> TokenLosses:
        return TokenLosses(self.ce.detach(), self.kd.detach(), self.topk_mass.detach())

    def weighted_sum(self, lam: float) -> Tensor:
        return ((1.0 - lam) * self.ce + lam * self.kd).sum()


def _divergence(logq: Tensor, logp: Tensor, config: LossSpec) -> Tensor:
    return divergence(logq, logp, config.divergence, config.jsd_beta, config.skew_alpha)


def _topk_losses(
    selected: Tensor,
    lse_rest: Tensor,
    target_logit: Tensor,
    teacher: TopKTeacher,
    vocab: int,
    config: LossSpec,
) -> TokenLosses:
    """selected: (t, k), lse_rest: (t,), target_logit: (t,) -> TokenLosses over t positions."""
    logq, lse_all = student_buckets(selected, lse_rest, config.temperature, teacher.keep)
    # The teacher follows the student's compute dtype, so a float64 cache cannot promote the whole loss.
    logprobs = teacher.logprobs.to(selected.dtype)
    complete = teacher.complete(vocab)
    logp, mass = teacher_topk_logprobs(logprobs, vocab, config.temperature, complete=complete)
    return TokenLosses(lse_all - target_logit, _divergence(logq, logp, config), mass)


def _full_losses(logits: Tensor, targets: Tensor, teacher_logits: Tensor, config: LossSpec) -> TokenLosses:
    """logits, teacher_logits: (t, vocab), targets: (t,) -> TokenLosses over t positions."""
    t = config.temperature
    # Skipping the division at T = 1 saves a (tokens, vocab) temporary per model.
    logq = F.log_softmax(logits if t == 1.0 else logits / t, -1)
    teacher_logits = teacher_logits.to(logits.dtype)
    logp = F.log_softmax(teacher_logits if t == 1.0 else teacher_logits / t, -1)
    ce_logprobs = logq if t == 1.0 else F.log_softmax(logits, -1)
    ce = -ce_logprobs.gather(-1, targets[:, None]).squeeze(-1)
    return TokenLosses(ce, _divergence(logq, logp, config), torch.ones_like(ce))


def token_losses(
    student_logits: Tensor, targets: Tensor, teacher: Teacher, config: LossSpec | None = None
) -> TokenLosses:
    """Unchunked per-position CE and KD by plain autograd; materialises several (tokens, vocab) tensors.

    student_logits: (tokens, vocab); targets: (tokens,) int
    """
    config = config or LossSpec()
    logits = upcast(student_logits)
    targets = targets.long()
    if isinstance(teacher, TopKTeacher):
        selected, lse_rest = topk_stats(logits, teacher.ids.long(), teacher.complete(logits.shape[-1]))
        target_logit = logits.gather(-1, targets[:, None]).squeeze(-1)
        return _topk_losses(selected, lse_rest, target_logit, teacher, logits.shape[-1], config)
    return _full_losses(logits, targets, teacher.full_logits(), config)


# -------------------------------------------------------------------------------------- chunked, fused


def _rest_exp_(logits: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Turn logits (t, vocab) in place into exp(logit - m) off the ids and 0 at them (m: row max off the ids).

    Returns that buffer, its row sums s (t,) and the log-sum-exp off the ids, m + log s (-inf when empty).
    A sum of positive terms keeps the student's tail exact however small (log(1 - sum(top-k)) would
    cancel), and reusing the logits buffer keeps one (t, vocab) tensor per chunk.
    """
    buf = logits.scatter_(-1, ids, -math.inf)
    row_max = buf.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    sums = buf.sub_(row_max).exp_().sum(-1)
    return buf, sums, row_max.squeeze(-1) + sums.log()


def _topk_chunk(
    logits: Tensor, targets: Tensor, teacher: TopKTeacher, config: LossSpec, need_grad: bool
) -> tuple[TokenLosses, Tensor | None]:
    """Losses of one chunk and d(sum of (1 - lam) * CE + lam * KD)/d(logits), built in the logits' own buffer.

    The loss depends on the logits (t, vocab) only through the k selected logits, the target logit and
    the log-sum-exp off the ids; autograd runs on those small tensors, and the chain rule back to the
    vocabulary is written out: d lse_rest / d z_v = exp(z_v - lse_rest) off the ids.
    """
    ids = teacher.ids.long()
    stats = [logits.gather(-1, ids), logits.gather(-1, targets[:, None]).squeeze(-1)]
    buf, sums, lse_rest = _rest_exp_(logits, ids)
    with torch.enable_grad():
        selected, target_logit, lse_rest = (x.detach().requires_grad_(need_grad) for x in [*stats, lse_rest])
        losses = _topk_losses(selected, lse_rest, target_logit, teacher, buf.shape[-1], config)
        if not need_grad:
            return losses.detach(), None
        leaves = [selected, target_logit, lse_rest]
        g_sel, g_target, g_rest = torch.autograd.grad(losses.weighted_sum(config.kd_weight), leaves)
    grad = buf.mul_(torch.where(sums > 0, g_rest / sums, 0.0)[:, None])
    # The buffer holds 0 at the ids; adding (not writing) keeps a kept id's gradient where a left-out entry
    # repeats that id with a zero gradient (TopKTeacher.keep).
    grad.scatter_add_(-1, ids, g_sel)
    grad.scatter_add_(-1, targets[:, None], g_target[:, None])  # the target may be one of the ids
    return losses.detach(), grad


def _full_chunk(
    logits: Tensor,
    targets: Tensor,
    teacher: FullVocabTeacher | TeacherHead,
    config: LossSpec,
    need_grad: bool,
) -> tuple[TokenLosses, Tensor | None]:
    """Losses of one chunk and the gradient wrt its logits (t, vocab), by autograd local to the chunk."""
    with torch.enable_grad():
        logits.requires_grad_(need_grad)
        losses = _full_losses(logits, targets, teacher.full_logits(), config)
        if not need_grad:
            return losses.detach(), None
        (grad,) = torch.autograd.grad(losses.weighted_sum(config.kd_weight), [logits])
    return losses.detach(), grad


@dataclass
class _Grads:
    """Gradients a chunked forward leaves for backward. hidden: (tokens, d); weight: (vocab, d) >= fp32."""

    hidden: Tensor | None
    weight: Tensor | None

    def add_chunk(self, grad_logits: Tensor, hidden: Tensor, weight: Tensor, start: int) -> None:
        """grad_logits: (t, vocab) float32 or float64; hidden: (t, d) the chunk's inputs."""
        if self.hidden is not None:
            rows = slice(start, start + hidden.shape[0])
            self.hidden[rows] = grad_logits.to(weight.dtype) @ weight
        if self.weight is None:
            return
        if weight.dtype == self.weight.dtype:
            self.weight.addmm_(grad_logits.T, hidden)
        else:  # low-precision GEMM, float32 accumulation across chunks
            self.weight.add_(grad_logits.to(weight.dtype).T @ hidden)


class _ChunkedKD(torch.autograd.Function):
    """Sum over positions of (1 - lam) * CE + lam * KD, projected and reduced one chunk at a time."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        teacher: Teacher,
        config: LossSpec,
        chunk_size: int,
        need_hidden: bool,
        need_weight: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n, need_grad = hidden.shape[0], need_hidden or need_weight
        grads = _Grads(
            torch.zeros_like(hidden) if need_hidden else None,
            torch.zeros_like(weight, dtype=upcast(weight).dtype) if need_weight else None,
        )
        chunk = _topk_chunk if isinstance(teacher, TopKTeacher) else _full_chunk
        parts: list[TokenLosses] = []
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            h = hidden[start:stop]
            logits = upcast(h @ weight.T)
            rows_teacher = teacher.rows(start, stop)
            losses, grad_logits = chunk(logits, targets[start:stop], rows_teacher, config, need_grad)
            if grad_logits is not None:
                grads.add_chunk(grad_logits, h, weight, start)
            parts.append(losses)
            del logits, grad_logits  # free this chunk's (t, vocab) buffer before the next one
        per_token = _concat(parts, hidden)
        ctx.grads, ctx.weight_dtype = grads, weight.dtype
        ctx.mark_non_differentiable(per_token.ce, per_token.kd, per_token.topk_mass)
        return per_token.weighted_sum(config.kd_weight), per_token.ce, per_token.kd, per_token.topk_mass

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        grads: _Grads | None = ctx.grads
        if grads is None:
            raise RuntimeError("chunked_kd_loss: its gradient was computed in forward and is handed out once")
        ctx.grads = None  # scaled in place below: never hand the same buffers out twice
        grad_hidden = None if grads.hidden is None else grads.hidden.mul_(grad_loss.to(grads.hidden.dtype))
        grad_weight = None if grads.weight is None else grads.weight.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _concat(parts: list[TokenLosses], like: Tensor) -> TokenLosses:
    if not parts:
        empty = like.new_zeros((0,), dtype=upcast(like).dtype)
        return TokenLosses(empty, empty.clone(), empty.clone())
    return TokenLosses(*(torch.cat([getattr(p, f) for p in parts]) for f in ("ce", "kd", "topk_mass")))


@dataclass(frozen=True)
class KDLossSums:
    """Sums over one call's supervised positions, for averaging over micro-batches and workers.

    loss_sum: () differentiable, sum of (1 - lam) * CE + lam * KD; ce_sum, kd_sum, topk_mass_sum: () detached;
    segment_*: (3,) detached sums per segment id (PROMPT, COT, ANSWER), or None without segment ids.
    """

    loss_sum: Tensor
    ce_sum: Tensor
    kd_sum: Tensor
    topk_mass_sum: Tensor
    n_tokens: int
    segment_ce_sum: Tensor | None = None
    segment_kd_sum: Tensor | None = None
    segment_tokens: Tensor | None = None

    def mean_loss(self, total_tokens: int | Tensor | None = None) -> Tensor:
        """loss_sum / total_tokens (default: this call's); 0 with no tokens.

        Pass the supervised-token count of the whole optimizer step (all micro-batches, all workers) to
        weight every token equally.
        """
        total = self.n_tokens if total_tokens is None else total_tokens
        return self.loss_sum / max(total, 1) if isinstance(total, int) else self.loss_sum / total.clamp(min=1)


def _segment_sums(values: list[Tensor], segment_ids: Tensor) -> list[Tensor]:
    index = segment_ids.long()
    if index.numel() and (index.min() < 0 or index.max() >= NUM_SEGMENTS):
        raise ValueError(f"segment_ids must be in [0, {NUM_SEGMENTS}) (PROMPT, COT, ANSWER)")
    return [v.new_zeros(NUM_SEGMENTS).index_add_(0, index, v) for v in values]


def _check_inputs(
    hidden: Tensor, weight: Tensor, targets: Tensor, teacher: Teacher, segments: Tensor | None
) -> None:
    n, vocab = hidden.shape[0], weight.shape[0]
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be (tokens, d), weight {tuple(weight.shape)} (vocab, d)"
        )
    rows = {"targets": targets.shape[0], "teacher": len(teacher)}
    if segments is not None:
        rows["segment_ids"] = segments.shape[0]
    if any(r != n for r in rows.values()):
        raise ValueError(f"every input needs one row per supervised token ({n}); got {rows}")
    if isinstance(teacher, TopKTeacher):
        _check_topk(teacher, vocab)


def _check_topk(teacher: TopKTeacher, vocab: int) -> None:
    ids = teacher.ids
    if ids.shape != teacher.logprobs.shape or ids.shape[-1] > vocab:
        raise ValueError(
            f"top-k ids {tuple(ids.shape)} and logprobs {tuple(teacher.logprobs.shape)} must both be"
            f" (tokens, k) with k <= vocab = {vocab}"
        )
    if ids.numel() and int(ids.max()) >= vocab:
        raise ValueError(
            f"top-k id {int(ids.max())} is past the student's {vocab} rows: restrict the teacher to the "
            "shared rows first (raykd.kd.teachers.shared_rows) and leave out positions with no entry left"
        )


def chunked_kd_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    teacher: Teacher,
    config: LossSpec | None = None,
    segment_ids: Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> KDLossSums:
    """CE + KD from the student's final hidden states at the supervised positions, one chunk at a time.

    hidden: (tokens, d); weight: (vocab, d) the lm_head (no bias); targets: (tokens,) int next-token ids;
    teacher: a signal with `tokens` rows; segment_ids: (tokens,) int in {0, 1, 2}, or None; chunk_size:
    positions per vocabulary-projection chunk (memory: one (chunk_size, vocab) float32 buffer).
    Gradients flow to hidden and weight through `loss_sum` only (once; no double backward). Zero tokens give
    zero sums and zero gradients.
    """
    config = config or LossSpec()
    if chunk_size < 1:
        raise ValueError(f"chunk_size {chunk_size} must be >= 1 (positions per vocabulary chunk)")
    _check_inputs(hidden, weight, targets, teacher, segment_ids)
    grad_on = torch.is_grad_enabled()
    loss_sum, ce, kd, mass = _ChunkedKD.apply(
        hidden,
        weight,
        targets.long(),
        teacher,
        config,
        chunk_size,
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
    )
    segments: list[Tensor | None] = [None, None, None]
    if segment_ids is not None:
        segments = list(_segment_sums([ce, kd, torch.ones_like(ce)], segment_ids))
    return KDLossSums(loss_sum, ce.sum(), kd.sum(), mass.sum(), ce.shape[0], *segments)


__all__ = ["CHUNK_SIZE", "NUM_SEGMENTS", "KDLossSums", "TokenLosses", "chunked_kd_loss", "token_losses"]
