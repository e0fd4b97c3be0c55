"""Divergences between two next-token distributions given as log-probs over the same buckets.

Pure torch (no Ray, DeepSpeed or vLLM). p = teacher, q = student; `divergence()` dispatches by the spec's name
(raykd.spec.DIVERGENCES):
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
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from raykd.spec import DIVERGENCES, Divergence


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
