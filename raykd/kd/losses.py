"""Cross-entropy and knowledge-distillation losses between teacher and student next-token distributions.

Pure torch (no Ray, DeepSpeed or vLLM). The training loss is `(1 - lam) * CE + lam * KD`, summed over the
supervised positions; `lam = 0.5`, forward KL and temperature 1 are the paper's setting.

Divergences (p = teacher, q = student, over the same buckets; `divergence()` dispatches by name):
    forward_kl       KL(p || q), the paper's; mass-covering
    reverse_kl       KL(q || p); mode-seeking
    jsd              beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q: the
                     generalised JSD of GKD (Agarwal et al.), in TRL's convention. The formula itself tends
                     to 0 at both ends, but JSD(beta) / beta -> KL(p || q) as beta -> 0 and
                     JSD(beta) / (1 - beta) -> KL(q || p) as beta -> 1; so, as in TRL, beta = 0 *is* forward
                     KL and beta = 1 *is* reverse KL.
    tvd              0.5 * sum |p - q|
    skew_forward_kl  KL(p || a * p + (1 - a) * q), DistiLLM's SKL with a = skew_alpha
    skew_reverse_kl  KL(q || (1 - a) * p + a * q), DistiLLM's SRKL; a = 0 gives the plain KLs. (DistiLLM's
                     code drops a constant entropy term; we keep it, so equal inputs give 0.)
Conventions: 0 * log 0 = 0; a bucket where the first argument has mass and the second none gives +inf,
as the true KL does; gradients stay finite (no NaN) on empty buckets.

Teacher signals:
    TopKTeacher       (default) the teacher's cached top-k log-probs per position as vLLM reports them
                      (over the full vocabulary, temperature 1). The mass outside the top-k is ONE tail
                      bucket, so the divergence runs over k + 1 buckets: teacher tail =
                      1 - sum(exp(topk_logprobs)); student tail = its probability off those k ids, computed
                      as a sum of positive terms (exact however small). The teacher tail is floored at
                      `tail_floor` and the buckets renormalised, because float32 logprobs near 0 can sum to
                      >= 1 while a softmax never gives an exact 0; with k = vocab the tail is empty (0).
                      The teacher's top-k mass (sum of its top-k probs) is returned for logging.
    FullVocabTeacher  online teacher logits (tokens, vocab): exact full-vocabulary divergence.
    TeacherHead       online teacher final hidden states + its lm_head: as FullVocabTeacher, but the
                      teacher's logits are also made one chunk at a time.

Temperature T (KD only; CE is always at T = 1; no T^2 factor, as in TRL and torchtune):
    full vocabulary: both distributions are softmax(logits / T), exact.
    top-k: the teacher's tail at T != 1 cannot be known from its top-k (it sums many unseen tokens), so T
    reshapes the distribution *within* the top-k and the tail bucket keeps its T = 1 mass, for both
    models: bucket_i = (1 - tail) * softmax(topk_logits / T)_i, bucket_tail = tail. It is the same map for
    teacher and student (equal models still give 0), exact at T = 1, and with k = vocab it equals the
    full-vocabulary tempering. It is an approximation of tempered KD whenever T != 1 and k < vocab.

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
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)
NUM_SEGMENTS = 3  # PROMPT = 0, COT = 1, ANSWER = 2, as in raykd/segments.py


def _upcast(x: Tensor) -> Tensor:
    """float16/bfloat16 -> float32 for softmax math; float32 and float64 stay (float64 for exact tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@dataclass(frozen=True)
class KDLossConfig:
    """How to mix and measure the loss; validated on construction, every problem reported at once."""

    divergence: Divergence = "forward_kl"
    lam: float = 0.5  # loss = (1 - lam) * CE + lam * KD
    temperature: float = 1.0  # KD only
    beta: float = 0.5  # jsd: 0 = forward KL, 1 = reverse KL
    skew_alpha: float = 0.1  # skew KLs: weight of the first argument's own distribution in the mixture
    chunk_size: int = 1024  # positions per vocabulary-projection chunk
    tail_floor: float = 1e-8  # smallest teacher tail mass when k < vocab

    def __post_init__(self) -> None:
        rules = [
            ("divergence", self.divergence in DIVERGENCES, f"is not one of {DIVERGENCES}"),
            ("lam", 0.0 <= self.lam <= 1.0, "is not in [0, 1]; loss = (1 - lam) * CE + lam * KD"),
            ("temperature", self.temperature > 0, "must be > 0"),
            ("beta", 0.0 <= self.beta <= 1.0, "is not in [0, 1]; 0 = forward KL, 1 = reverse KL"),
            ("skew_alpha", 0.0 <= self.skew_alpha < 1.0, "is not in [0, 1)"),
            ("chunk_size", self.chunk_size >= 1, "must be >= 1"),
            ("tail_floor", 0.0 < self.tail_floor < 1.0, "is not in (0, 1)"),
        ]
        problems = [f"{name}: {getattr(self, name)!r} {why}" for name, ok, why in rules if not ok]
        if problems:
            raise ValueError("invalid KDLossConfig: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------- divergences


def _kl(logp_a: Tensor, logp_b: Tensor) -> Tensor:
    """KL(a || b) per row with 0 * log 0 = 0. logp_a, logp_b: (rows, buckets) -> (rows,)"""
    a = logp_a.exp()
    # where() keeps 0 * (-inf - -inf) = NaN out of the value and (its other branch is a constant) the grad.
    return (a * torch.where(a > 0, logp_a - logp_b, 0.0)).sum(-1)


def _log_mix(logp: Tensor, logq: Tensor, w: float) -> Tensor:
    """log(w * p + (1 - w) * q) for 0 < w < 1. logp, logq: (rows, buckets) -> (rows, buckets)"""
    # logaddexp(-inf, -inf) has a NaN gradient: feed it zeros where both are empty, then put the -inf back.
    both_empty = torch.isneginf(logp) & torch.isneginf(logq)
    mix = torch.logaddexp(
        torch.where(both_empty, 0.0, logp) + math.log(w), torch.where(both_empty, 0.0, logq) + math.log1p(-w)
    )
    return torch.where(both_empty, -math.inf, mix)


def forward_kl(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """KL(teacher || student). student_logprobs, teacher_logprobs: (rows, buckets) -> (rows,)"""
    return _kl(teacher_logprobs, student_logprobs)


def reverse_kl(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """KL(student || teacher). student_logprobs, teacher_logprobs: (rows, buckets) -> (rows,)"""
    return _kl(student_logprobs, teacher_logprobs)


def jsd(student_logprobs: Tensor, teacher_logprobs: Tensor, beta: float = 0.5) -> Tensor:
    """Generalised JSD (module docstring): beta = 0 is forward KL, 1 reverse KL. (rows, buckets) -> (rows,)"""
    if beta == 0.0:
        return forward_kl(student_logprobs, teacher_logprobs)
    if beta == 1.0:
        return reverse_kl(student_logprobs, teacher_logprobs)
    mix = _log_mix(teacher_logprobs, student_logprobs, beta)
    return beta * _kl(teacher_logprobs, mix) + (1.0 - beta) * _kl(student_logprobs, mix)


def tvd(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Total variation distance 0.5 * sum |p - q|. (rows, buckets) -> (rows,)"""
    return 0.5 * (teacher_logprobs.exp() - student_logprobs.exp()).abs().sum(-1)


def skew_forward_kl(student_logprobs: Tensor, teacher_logprobs: Tensor, alpha: float = 0.1) -> Tensor:
    """KL(p || alpha * p + (1 - alpha) * q), DistiLLM's SKL. (rows, buckets) -> (rows,)"""
    if alpha == 0.0:
        return forward_kl(student_logprobs, teacher_logprobs)
    return _kl(teacher_logprobs, _log_mix(teacher_logprobs, student_logprobs, alpha))


def skew_reverse_kl(student_logprobs: Tensor, teacher_logprobs: Tensor, alpha: float = 0.1) -> Tensor:
    """KL(q || (1 - alpha) * p + alpha * q), DistiLLM's SRKL. (rows, buckets) -> (rows,)"""
    if alpha == 0.0:
        return reverse_kl(student_logprobs, teacher_logprobs)
    return _kl(student_logprobs, _log_mix(teacher_logprobs, student_logprobs, 1.0 - alpha))


def divergence(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    kind: Divergence,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> Tensor:
    """The named divergence between two distributions given as log-probs. (rows, buckets) -> (rows,)"""
    if kind == "jsd":
        return jsd(student_logprobs, teacher_logprobs, beta)
    if kind in ("skew_forward_kl", "skew_reverse_kl"):
        fn = skew_forward_kl if kind == "skew_forward_kl" else skew_reverse_kl
        return fn(student_logprobs, teacher_logprobs, skew_alpha)
    simple = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "tvd": tvd}
    if kind not in simple:
        raise ValueError(f"unknown divergence {kind!r}; use one of {DIVERGENCES}")
    return simple[kind](student_logprobs, teacher_logprobs)


# ------------------------------------------------------------------------------------- teacher signals


@dataclass(frozen=True)
class TopKTeacher:
    """Cached teacher. ids: (tokens, k) int, distinct per row; logprobs: (tokens, k), full vocab, T = 1."""

    ids: Tensor
    logprobs: Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, start: int, stop: int) -> TopKTeacher:
        return TopKTeacher(self.ids[start:stop], self.logprobs[start:stop])


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
        return _upcast(self.logits.detach())


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
            return _upcast(self.hidden @ self.weight.T)


Teacher = TopKTeacher | FullVocabTeacher | TeacherHead


# --------------------------------------------------------------------------------------- top-k buckets


def teacher_topk_logprobs(
    topk_logprobs: Tensor, vocab_size: int, temperature: float = 1.0, tail_floor: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """Teacher log-probs over k + 1 buckets (the k ids, then the tail) and its reported top-k mass.

    topk_logprobs: (tokens, k) -> buckets (tokens, k + 1), topk_mass (tokens,)
    """
    logprobs = _upcast(topk_logprobs.detach())
    lse = logprobs.logsumexp(-1)
    if logprobs.shape[-1] >= vocab_size:
        log_top, log_tail = torch.zeros_like(lse), torch.full_like(lse, -math.inf)
    else:
        tail = (-torch.expm1(lse)).clamp(min=tail_floor)  # 1 - sum(p), without cancellation near sum = 0
        log_top, log_tail = torch.log1p(-tail), tail.log()
    top = log_top[:, None] + F.log_softmax(logprobs / temperature, -1)
    return torch.cat([top, log_tail[:, None]], -1), lse.exp().clamp(max=1.0)


def _student_buckets(selected: Tensor, lse_rest: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Student log-probs over k + 1 buckets, from its logits at the k ids and the log-sum-exp of all others.

    selected: (tokens, k); lse_rest: (tokens,), -inf when the k ids are the whole vocabulary
    -> buckets (tokens, k + 1), log-partition over the full vocabulary (tokens,)
    """
    lse_top = selected.logsumexp(-1)
    lse_all = torch.logaddexp(lse_top, lse_rest)
    top = (lse_top - lse_all)[:, None] + F.log_softmax(selected / temperature, -1)
    return torch.cat([top, (lse_rest - lse_all)[:, None]], -1), lse_all


def _topk_stats(logits: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Logits at the ids and log-sum-exp of the rest. logits: (t, vocab), ids: (t, k) -> (t, k), (t,)"""
    selected = logits.gather(-1, ids)
    if ids.shape[-1] >= logits.shape[-1]:
        # An empty complement: a constant, since logsumexp over all -inf has a NaN gradient.
        return selected, logits.new_full(logits.shape[:1], -math.inf)
    return selected, logits.scatter(-1, ids, -math.inf).logsumexp(-1)


def student_topk_logprobs(student_logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """Student log-probs over the teacher's k + 1 buckets.

    student_logits: (tokens, vocab); ids: (tokens, k) -> (tokens, k + 1)
    """
    return _student_buckets(*_topk_stats(_upcast(student_logits), ids.long()), temperature)[0]


# ------------------------------------------------------------------------------------ per-token losses


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


def _divergence(logq: Tensor, logp: Tensor, config: KDLossConfig) -> Tensor:
    return divergence(logq, logp, config.divergence, config.beta, config.skew_alpha)


def _topk_losses(
    selected: Tensor,
    lse_rest: Tensor,
    target_logit: Tensor,
    teacher: TopKTeacher,
    vocab: int,
    config: KDLossConfig,
) -> TokenLosses:
    """selected: (t, k), lse_rest: (t,), target_logit: (t,) -> TokenLosses over t positions."""
    logq, lse_all = _student_buckets(selected, lse_rest, config.temperature)
    # The teacher follows the student's compute dtype, so a float64 cache cannot promote the whole loss.
    logprobs = teacher.logprobs.to(selected.dtype)
    logp, mass = teacher_topk_logprobs(logprobs, vocab, config.temperature, config.tail_floor)
    return TokenLosses(lse_all - target_logit, _divergence(logq, logp, config), mass)


def _full_losses(
    logits: Tensor, targets: Tensor, teacher_logits: Tensor, config: KDLossConfig
) -> TokenLosses:
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
    student_logits: Tensor, targets: Tensor, teacher: Teacher, config: KDLossConfig | None = None
) -> TokenLosses:
    """Unchunked per-position CE and KD by plain autograd; materialises several (tokens, vocab) tensors.

    student_logits: (tokens, vocab); targets: (tokens,) int
    """
    config = config or KDLossConfig()
    logits = _upcast(student_logits)
    targets = targets.long()
    if isinstance(teacher, TopKTeacher):
        selected, lse_rest = _topk_stats(logits, teacher.ids.long())
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
    logits: Tensor, targets: Tensor, teacher: TopKTeacher, config: KDLossConfig, need_grad: bool
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
        g_sel, g_target, g_rest = torch.autograd.grad(losses.weighted_sum(config.lam), leaves)
    grad = buf.mul_(torch.where(sums > 0, g_rest / sums, 0.0)[:, None])
    grad.scatter_(-1, ids, g_sel)  # ids are distinct; the buffer holds 0 there
    grad.scatter_add_(-1, targets[:, None], g_target[:, None])  # the target may be one of the ids
    return losses.detach(), grad


def _full_chunk(
    logits: Tensor,
    targets: Tensor,
    teacher: FullVocabTeacher | TeacherHead,
    config: KDLossConfig,
    need_grad: bool,
) -> tuple[TokenLosses, Tensor | None]:
    """Losses of one chunk and the gradient wrt its logits (t, vocab), by autograd local to the chunk."""
    with torch.enable_grad():
        logits.requires_grad_(need_grad)
        losses = _full_losses(logits, targets, teacher.full_logits(), config)
        if not need_grad:
            return losses.detach(), None
        (grad,) = torch.autograd.grad(losses.weighted_sum(config.lam), [logits])
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
        config: KDLossConfig,
        need_hidden: bool,
        need_weight: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n, need_grad = hidden.shape[0], need_hidden or need_weight
        grads = _Grads(
            torch.zeros_like(hidden) if need_hidden else None,
            torch.zeros_like(weight, dtype=_upcast(weight).dtype) if need_weight else None,
        )
        chunk = _topk_chunk if isinstance(teacher, TopKTeacher) else _full_chunk
        parts: list[TokenLosses] = []
        for start in range(0, n, config.chunk_size):
            stop = min(start + config.chunk_size, n)
            h = hidden[start:stop]
            logits = _upcast(h @ weight.T)
            rows_teacher = teacher.rows(start, stop)
            losses, grad_logits = chunk(logits, targets[start:stop], rows_teacher, config, need_grad)
            if grad_logits is not None:
                grads.add_chunk(grad_logits, h, weight, start)
            parts.append(losses)
            del logits, grad_logits  # free this chunk's (t, vocab) buffer before the next one
        per_token = _concat(parts, hidden)
        ctx.grads, ctx.weight_dtype = grads, weight.dtype
        ctx.mark_non_differentiable(per_token.ce, per_token.kd, per_token.topk_mass)
        return per_token.weighted_sum(config.lam), per_token.ce, per_token.kd, per_token.topk_mass

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        grads: _Grads | None = ctx.grads
        if grads is None:
            raise RuntimeError("chunked_kd_loss: its gradient was computed in forward and is handed out once")
        ctx.grads = None  # scaled in place below: never hand the same buffers out twice
        grad_hidden = None if grads.hidden is None else grads.hidden.mul_(grad_loss.to(grads.hidden.dtype))
        grad_weight = None if grads.weight is None else grads.weight.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _concat(parts: list[TokenLosses], like: Tensor) -> TokenLosses:
    if not parts:
        empty = like.new_zeros((0,), dtype=_upcast(like).dtype)
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
    if isinstance(teacher, TopKTeacher) and (
        teacher.ids.shape != teacher.logprobs.shape or teacher.ids.shape[-1] > vocab
    ):
        raise ValueError(
            f"top-k ids {tuple(teacher.ids.shape)} and logprobs {tuple(teacher.logprobs.shape)} must both be"
            f" (tokens, k) with k <= vocab = {vocab}"
        )


def chunked_kd_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    teacher: Teacher,
    config: KDLossConfig | None = None,
    segment_ids: Tensor | None = None,
) -> KDLossSums:
    """CE + KD from the student's final hidden states at the supervised positions, one chunk at a time.

    hidden: (tokens, d); weight: (vocab, d) the lm_head (no bias); targets: (tokens,) int next-token ids;
    teacher: a signal with `tokens` rows; segment_ids: (tokens,) int in {0, 1, 2}, or None.
    Gradients flow to hidden and weight through `loss_sum` only (once; no double backward). Zero tokens give
    zero sums and zero gradients.
    """
    config = config or KDLossConfig()
    _check_inputs(hidden, weight, targets, teacher, segment_ids)
    grad_on = torch.is_grad_enabled()
    loss_sum, ce, kd, mass = _ChunkedKD.apply(
        hidden,
        weight,
        targets.long(),
        teacher,
        config,
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
    )
    segments: list[Tensor | None] = [None, None, None]
    if segment_ids is not None:
        segments = list(_segment_sums([ce, kd, torch.ones_like(ce)], segment_ids))
    return KDLossSums(loss_sum, ce.sum(), kd.sum(), mass.sum(), ce.shape[0], *segments)


__all__ = [
    "DIVERGENCES",
    "NUM_SEGMENTS",
    "Divergence",
    "FullVocabTeacher",
    "KDLossConfig",
    "KDLossSums",
    "Teacher",
    "TeacherHead",
    "TokenLosses",
    "TopKTeacher",
    "chunked_kd_loss",
    "divergence",
    "forward_kl",
    "jsd",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "student_topk_logprobs",
    "teacher_topk_logprobs",
    "token_losses",
    "tvd",
]
