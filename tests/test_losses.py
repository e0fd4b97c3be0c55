"""raykd.kd.losses, .divergences and .teachers against independent references: torch's kl_div /
cross_entropy, float64 hand formulas, finite differences, and the plain unchunked computation."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from raykd.kd.divergences import divergence, forward_kl, jsd, reverse_kl, skew_forward_kl, skew_reverse_kl
from raykd.kd.losses import chunked_kd_loss, token_losses
from raykd.kd.teachers import (
    FullVocabTeacher,
    TeacherHead,
    TopKTeacher,
    student_topk_logprobs,
    teacher_topk_logprobs,
)
from raykd.spec import DIVERGENCES, LossSpec

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_logprobs(rows: int, buckets: int, seed: int, scale: float = 2.0) -> Tensor:
    return (torch.randn(rows, buckets, generator=gen(seed), dtype=F64) * scale).log_softmax(-1)


# Hand formulas in probability space, float64, written independently of the module (p teacher, q student).
def _kl(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(a > 0, a * (a / b).log(), torch.zeros_like(a)).sum(-1)


def hand(kind: str, p: Tensor, q: Tensor, beta: float = 0.5, alpha: float = 0.1) -> Tensor:
    if kind == "forward_kl":
        return _kl(p, q)
    if kind == "reverse_kl":
        return _kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "skew_forward_kl":
        return _kl(p, alpha * p + (1 - alpha) * q)
    assert kind == "skew_reverse_kl"
    return _kl(q, (1 - alpha) * p + alpha * q)


# ------------------------------------------------------------------------------------------- divergences


def test_forward_kl_matches_torch_kl_div() -> None:
    logq, logp = rand_logprobs(6, 9, seed=1), rand_logprobs(6, 9, seed=2)
    expected = F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(forward_kl(logq, logp), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(forward_kl(logq.float(), logp.float()), expected.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize(("beta", "alpha"), [(0.5, 0.1), (0.1, 0.3), (0.9, 0.5)])
def test_divergences_match_float64_formulas(kind: str, beta: float, alpha: float) -> None:
    logq, logp = rand_logprobs(5, 7, seed=3), rand_logprobs(5, 7, seed=4)
    got = divergence(logq, logp, kind, beta=beta, skew_alpha=alpha)  # type: ignore[arg-type]
    torch.testing.assert_close(got, hand(kind, logp.exp(), logq.exp(), beta, alpha), rtol=1e-10, atol=1e-12)
    assert (got >= 0).all()


def test_jsd_half_is_the_symmetric_jensen_shannon() -> None:
    logq, logp = rand_logprobs(4, 6, seed=5), rand_logprobs(4, 6, seed=6)
    p, q = logp.exp(), logq.exp()
    m = (p + q) / 2
    expected = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    torch.testing.assert_close(jsd(logq, logp, 0.5), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jsd(logq, logp, 0.5), jsd(logp, logq, 0.5), rtol=1e-12, atol=1e-12)


def with_empty_buckets(logprobs: Tensor) -> Tensor:
    """Zero out buckets 0 and 1 of every row and renormalise (log 0 = -inf)."""
    out = logprobs.clone()
    out[:, :2] = -math.inf
    return out.log_softmax(-1)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("empty", [False, True])
def test_identical_distributions_give_zero_with_finite_gradient(kind: str, empty: bool) -> None:
    logp = rand_logprobs(4, 8, seed=7)
    logp = with_empty_buckets(logp) if empty else logp
    logq = logp.clone().requires_grad_(True)
    value = divergence(logq, logp, kind)  # type: ignore[arg-type]
    torch.testing.assert_close(value, torch.zeros(4, dtype=F64), rtol=0, atol=1e-14)
    (grad,) = torch.autograd.grad(value.sum(), logq)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_teacher_empty_buckets_follow_0_log_0_convention(kind: str) -> None:
    logp = with_empty_buckets(rand_logprobs(3, 6, seed=8))
    logq = rand_logprobs(3, 6, seed=9).requires_grad_(True)
    value = divergence(logq, logp, kind)  # type: ignore[arg-type]
    if kind == "reverse_kl":  # the student puts mass where the teacher has none: the true KL is infinite
        assert torch.isinf(value).all()
        return
    torch.testing.assert_close(value, hand(kind, logp.exp(), logq.detach().exp()), rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(value.sum(), logq)
    assert torch.isfinite(grad).all()


def test_jsd_endpoints_are_the_kls_and_their_limits() -> None:
    logq, logp = rand_logprobs(5, 7, seed=10), rand_logprobs(5, 7, seed=11)
    fkl, rkl = forward_kl(logq, logp), reverse_kl(logq, logp)
    torch.testing.assert_close(jsd(logq, logp, 0.0), fkl, rtol=0, atol=0)
    torch.testing.assert_close(jsd(logq, logp, 1.0), rkl, rtol=0, atol=0)
    # The endpoints are where the rescaled generalised JSD tends, not arbitrary special cases.
    eps = 1e-7
    torch.testing.assert_close(jsd(logq, logp, eps) / eps, fkl, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(jsd(logq, logp, 1 - eps) / eps, rkl, rtol=1e-5, atol=1e-8)


def test_skew_kls_at_alpha_zero_are_the_plain_kls() -> None:
    logq, logp = rand_logprobs(5, 7, seed=12), rand_logprobs(5, 7, seed=13)
    torch.testing.assert_close(skew_forward_kl(logq, logp, 0.0), forward_kl(logq, logp), rtol=0, atol=0)
    torch.testing.assert_close(skew_reverse_kl(logq, logp, 0.0), reverse_kl(logq, logp), rtol=0, atol=0)
    # Near alpha = 0 the mixture formula meets the plain KL continuously.
    torch.testing.assert_close(skew_forward_kl(logq, logp, 1e-9), forward_kl(logq, logp), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------- teacher signals


def topk_setup(
    tokens: int, vocab: int, k: int, seed: int, dtype: torch.dtype = F64
) -> tuple[Tensor, Tensor, TopKTeacher, Tensor]:
    """Random student logits, targets, the top-k of a random teacher and the teacher's full logits."""
    g = gen(seed)
    student = torch.randn(tokens, vocab, generator=g, dtype=F64) * 2
    teacher_logits = torch.randn(tokens, vocab, generator=g, dtype=F64) * 3
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    top = teacher_logits.log_softmax(-1).topk(k, -1)
    return student.to(dtype), targets, TopKTeacher(top.indices, top.values.to(dtype)), teacher_logits


def hand_topk_buckets(logits: Tensor, ids: Tensor) -> Tensor:
    """[softmax(logits)[ids], 1 - their sum], float64. logits: (tokens, vocab) -> (tokens, k + 1)"""
    probs = logits.double().softmax(-1).gather(-1, ids)
    return torch.cat([probs, 1 - probs.sum(-1, keepdim=True)], -1)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_topk_kd_is_the_divergence_over_k_plus_tail_buckets(kind: str) -> None:
    student, targets, teacher, teacher_logits = topk_setup(6, 40, 5, seed=20)
    losses = token_losses(student, targets, teacher, LossSpec(divergence=kind))
    p, q = hand_topk_buckets(teacher_logits, teacher.ids), hand_topk_buckets(student, teacher.ids)
    torch.testing.assert_close(losses.kd, hand(kind, p, q), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(losses.topk_mass, p[:, :-1].sum(-1), rtol=1e-12, atol=1e-12)


def test_bucket_log_probs_match_hand_formulas() -> None:
    student, _, teacher, teacher_logits = topk_setup(4, 30, 6, seed=21)
    logp, mass = teacher_topk_logprobs(teacher.logprobs, vocab_size=30)
    torch.testing.assert_close(logp.exp(), hand_topk_buckets(teacher_logits, teacher.ids), rtol=1e-10, atol=0)
    torch.testing.assert_close(mass, teacher.logprobs.exp().sum(-1), rtol=1e-12, atol=0)
    logq = student_topk_logprobs(student, teacher.ids)
    torch.testing.assert_close(logq.exp(), hand_topk_buckets(student, teacher.ids), rtol=1e-10, atol=0)


def test_topk_temperature_reshapes_within_topk_and_keeps_tail_mass() -> None:
    """The documented scheme: bucket_i = (1 - tail) * softmax(topk_logits / T)_i, bucket_tail = tail."""
    student, targets, teacher, teacher_logits = topk_setup(5, 30, 4, seed=22)
    t = 2.5

    def tempered(logits: Tensor) -> Tensor:
        buckets = hand_topk_buckets(logits, teacher.ids)
        top = (logits.gather(-1, teacher.ids) / t).softmax(-1) * (1 - buckets[:, -1:])
        return torch.cat([top, buckets[:, -1:]], -1)

    losses = token_losses(student, targets, teacher, LossSpec(temperature=t))
    expected = hand("forward_kl", tempered(teacher_logits), tempered(student))
    torch.testing.assert_close(losses.kd, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(losses.ce, F.cross_entropy(student, targets, reduction="none"))  # CE at T = 1


def test_teacher_tail_is_floored_when_reported_topk_sums_to_one_or_more() -> None:
    # float32 teacher logprobs of a near-certain token can sum to >= 1 over the top-k.
    reported = torch.tensor([[math.log(0.7), math.log(0.3 + 1e-6)], [0.0, -30.0]], dtype=F64)
    logp, mass = teacher_topk_logprobs(reported, vocab_size=10, tail_floor=1e-8)
    torch.testing.assert_close(logp[:, -1].exp(), torch.full((2,), 1e-8, dtype=F64))
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(mass, torch.ones(2, dtype=F64))
    logq = rand_logprobs(2, 3, seed=23)
    assert torch.isfinite(reverse_kl(logq, logp)).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_k_equal_to_vocab_is_full_vocab_kd(kind: str, temperature: float) -> None:
    vocab = 12
    student, targets, _, teacher_logits = topk_setup(5, vocab, 3, seed=24)
    full_lp = teacher_logits.log_softmax(-1)
    order = full_lp.argsort(-1, descending=True)
    topk = TopKTeacher(order, full_lp.gather(-1, order))
    config = LossSpec(divergence=kind, temperature=temperature)
    student = student.requires_grad_(True)
    from_topk = token_losses(student, targets, topk, config)
    from_full = token_losses(student, targets, FullVocabTeacher(teacher_logits), config)
    torch.testing.assert_close(from_topk.kd, from_full.kd, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(from_topk.ce, from_full.ce, rtol=1e-12, atol=1e-12)
    (g_topk,) = torch.autograd.grad(from_topk.kd.sum(), student)
    (g_full,) = torch.autograd.grad(from_full.kd.sum(), student)
    torch.testing.assert_close(g_topk, g_full, rtol=1e-9, atol=1e-12)
    p, q = (full_lp / temperature).softmax(-1), (student.detach() / temperature).softmax(-1)
    torch.testing.assert_close(from_full.kd, hand(kind, p, q), rtol=1e-9, atol=1e-12)


def test_cross_entropy_matches_torch() -> None:
    student, targets, teacher, teacher_logits = topk_setup(7, 25, 4, seed=25)
    expected = F.cross_entropy(student, targets, reduction="none")
    for signal in (teacher, FullVocabTeacher(teacher_logits)):
        torch.testing.assert_close(
            token_losses(student, targets, signal).ce, expected, rtol=1e-12, atol=1e-12
        )


# ------------------------------------------------------------------------------------------ chunked path


def model_setup(tokens: int, vocab: int, d: int, k: int, seed: int) -> dict:
    g = gen(seed)
    hidden = torch.randn(tokens, d, generator=g, dtype=F64).requires_grad_(True)
    weight = (torch.randn(vocab, d, generator=g, dtype=F64) / math.sqrt(d) * 3).requires_grad_(True)
    teacher_hidden = torch.randn(tokens, d + 1, generator=g, dtype=F64)
    teacher_weight = torch.randn(vocab, d + 1, generator=g, dtype=F64) / math.sqrt(d)
    teacher_logits = teacher_hidden @ teacher_weight.T
    top = teacher_logits.log_softmax(-1).topk(k, -1)
    # Make some targets one of the top-k ids, some not, so both gradient paths are exercised.
    targets = torch.where(
        torch.arange(tokens) % 2 == 0, top.indices[:, 0], torch.randint(0, vocab, (tokens,), generator=g)
    )
    teachers = {
        "topk": TopKTeacher(top.indices, top.values),
        "full": FullVocabTeacher(teacher_logits),
        "head": TeacherHead(teacher_hidden, teacher_weight),
    }
    return {"hidden": hidden, "weight": weight, "targets": targets, "teachers": teachers}


def reference_sums(setup: dict, teacher_name: str, config: LossSpec) -> tuple[list[Tensor], list[Tensor]]:
    """[loss_sum, ce_sum, kd_sum, mass_sum] and [d hidden, d weight] by the plain unchunked path."""
    hidden, weight = setup["hidden"], setup["weight"]
    teacher = setup["teachers"][teacher_name]
    if isinstance(teacher, TeacherHead):
        teacher = FullVocabTeacher(teacher.hidden @ teacher.weight.T)
    losses = token_losses(hidden @ weight.T, setup["targets"], teacher, config)
    loss = losses.weighted_sum(config.kd_weight)
    grads = list(torch.autograd.grad(loss, [hidden, weight]))
    return [loss.detach(), losses.ce.sum().detach(), losses.kd.sum().detach(), losses.topk_mass.sum()], grads


def chunked_sums(
    setup: dict, teacher_name: str, config: LossSpec, chunk_size: int
) -> tuple[list[Tensor], list[Tensor]]:
    hidden, weight = setup["hidden"], setup["weight"]
    teacher = setup["teachers"][teacher_name]
    sums = chunked_kd_loss(hidden, weight, setup["targets"], teacher, config, chunk_size=chunk_size)
    grads = list(torch.autograd.grad(sums.loss_sum, [hidden, weight]))
    return [sums.loss_sum.detach(), sums.ce_sum, sums.kd_sum, sums.topk_mass_sum], grads


def assert_all_close(
    got: list[Tensor], expected: list[Tensor], rtol: float = 1e-10, atol: float = 1e-12
) -> None:
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("teacher_name", ["topk", "full", "head"])
@pytest.mark.parametrize("chunk_size", [1, 3, 5, 13, 64])
def test_chunked_equals_unchunked_values_and_gradients(teacher_name: str, chunk_size: int) -> None:
    setup = model_setup(tokens=13, vocab=31, d=6, k=4, seed=30)
    config = LossSpec(kd_weight=0.3)
    got_values, got_grads = chunked_sums(setup, teacher_name, config, chunk_size)
    ref_values, ref_grads = reference_sums(setup, teacher_name, config)
    assert_all_close(got_values, ref_values)
    assert_all_close(got_grads, ref_grads)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize(("lam", "temperature"), [(0.0, 1.0), (1.0, 1.0), (0.5, 2.0)])
def test_chunked_equals_unchunked_for_every_divergence(kind: str, lam: float, temperature: float) -> None:
    setup = model_setup(tokens=9, vocab=23, d=5, k=3, seed=31)
    config = LossSpec(divergence=kind, kd_weight=lam, temperature=temperature)
    for teacher_name in ("topk", "full"):
        got_values, got_grads = chunked_sums(setup, teacher_name, config, 4)
        ref_values, ref_grads = reference_sums(setup, teacher_name, config)
        assert_all_close(got_values, ref_values)
        assert_all_close(got_grads, ref_grads)


def central_differences(fn: Callable[[], Tensor], x: Tensor, eps: float = 1e-6) -> Tensor:
    """d fn / d x by central differences, one entry at a time (x is modified and restored in place)."""
    grad = torch.zeros_like(x)
    flat, out = x.detach().view(-1), grad.view(-1)
    for i in range(flat.numel()):
        saved = flat[i].item()
        flat[i] = saved + eps
        up = fn().item()
        flat[i] = saved - eps
        down = fn().item()
        flat[i] = saved
        out[i] = (up - down) / (2 * eps)
    return grad


@pytest.mark.parametrize("teacher_name", ["topk", "full"])
def test_chunked_gradient_matches_finite_differences(teacher_name: str) -> None:
    setup = model_setup(tokens=5, vocab=7, d=3, k=3, seed=32)
    hidden, weight, targets = setup["hidden"], setup["weight"], setup["targets"]
    teacher = setup["teachers"][teacher_name]
    config = LossSpec(divergence="jsd", kd_weight=0.4)

    def loss() -> Tensor:
        return chunked_kd_loss(hidden, weight, targets, teacher, config, chunk_size=2).loss_sum

    analytic = torch.autograd.grad(loss(), [hidden, weight])
    with torch.no_grad():
        numeric = [central_differences(loss, hidden), central_differences(loss, weight)]
    assert_all_close(list(analytic), numeric, rtol=1e-6, atol=1e-8)


def test_chunked_topk_with_k_equal_to_vocab_matches_full_vocab() -> None:
    setup = model_setup(tokens=6, vocab=9, d=4, k=9, seed=33)
    config = LossSpec(divergence="reverse_kl")
    got_values, got_grads = chunked_sums(setup, "topk", config, 4)
    ref_values, ref_grads = chunked_sums(setup, "full", config, 4)
    assert_all_close(got_values[:3], ref_values[:3], rtol=1e-9)
    assert_all_close(got_grads, ref_grads, rtol=1e-9)
    assert all(torch.isfinite(g).all() for g in got_grads)


def test_chunked_cross_entropy_matches_torch() -> None:
    setup = model_setup(tokens=11, vocab=17, d=4, k=3, seed=34)
    hidden, weight = setup["hidden"], setup["weight"]
    sums = chunked_kd_loss(hidden, weight, setup["targets"], setup["teachers"]["topk"], chunk_size=4)
    expected = F.cross_entropy(hidden @ weight.T, setup["targets"], reduction="sum")
    torch.testing.assert_close(sums.ce_sum, expected.detach(), rtol=1e-12, atol=1e-12)
    assert sums.n_tokens == 11


def test_tiny_student_tail_stays_exact_in_float32() -> None:
    """A student tail of ~1e-11 next to a teacher tail of 0.5: 1 - sum(top-k) would round to 0 in float32."""
    vocab, k, tokens = 50, 2, 3
    student = torch.zeros(tokens, vocab)
    student[:, :k] = 30.0
    teacher = TopKTeacher(torch.arange(k).repeat(tokens, 1), torch.full((tokens, k), math.log(0.25)))
    targets = torch.zeros(tokens, dtype=torch.long)
    # hidden = identity, so the logits are exactly `student`
    sums = chunked_kd_loss(
        torch.eye(tokens), student.T.contiguous(), targets, teacher, LossSpec(kd_weight=1.0)
    )
    q_tail = (vocab - k) / (vocab - k + k * math.exp(30.0))
    q_top = (1 - q_tail) / k
    expected = tokens * (2 * 0.25 * math.log(0.25 / q_top) + 0.5 * math.log(0.5 / q_tail))
    assert sums.kd_sum.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("teacher_name", ["topk", "full", "head"])
def test_all_tokens_masked_gives_zero_not_nan_and_zero_gradients(teacher_name: str) -> None:
    full = model_setup(tokens=4, vocab=11, d=3, k=2, seed=35)
    hidden = full["hidden"].detach()[:0].requires_grad_(True)
    weight = full["weight"]
    teacher = full["teachers"][teacher_name]
    teacher = teacher.rows(0, 0)
    segments = torch.zeros(0, dtype=torch.int8)
    sums = chunked_kd_loss(hidden, weight, full["targets"][:0], teacher, segment_ids=segments)
    for value in (sums.loss_sum, sums.ce_sum, sums.kd_sum, sums.topk_mass_sum, sums.mean_loss()):
        assert value.item() == 0.0
    assert sums.n_tokens == 0
    sums.mean_loss().backward()
    assert hidden.grad is not None and hidden.grad.shape == (0, 3)
    assert weight.grad is not None and torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(sums.segment_tokens, torch.zeros(3, dtype=F64))


def test_segment_sums_split_the_totals() -> None:
    setup = model_setup(tokens=10, vocab=13, d=4, k=3, seed=36)
    segments = torch.tensor([0, 0, 1, 1, 1, 1, 1, 2, 2, 1], dtype=torch.int8)
    teacher = setup["teachers"]["topk"]
    sums = chunked_kd_loss(
        setup["hidden"], setup["weight"], setup["targets"], teacher, segment_ids=segments, chunk_size=3
    )
    per_token = token_losses(setup["hidden"] @ setup["weight"].T, setup["targets"], teacher)
    for s in range(3):
        mask = segments == s
        torch.testing.assert_close(sums.segment_ce_sum[s], per_token.ce[mask].sum().detach())
        torch.testing.assert_close(sums.segment_kd_sum[s], per_token.kd[mask].sum().detach())
    assert sums.segment_tokens.tolist() == [2.0, 6.0, 2.0]
    torch.testing.assert_close(sums.segment_kd_sum.sum(), sums.kd_sum)
    with pytest.raises(ValueError, match="segment_ids"):
        chunked_kd_loss(setup["hidden"], setup["weight"], setup["targets"], teacher, segment_ids=segments + 2)


def test_micro_batches_average_like_one_batch() -> None:
    setup = model_setup(tokens=10, vocab=13, d=4, k=3, seed=37)
    hidden, weight, targets, teacher = (
        setup["hidden"],
        setup["weight"],
        setup["targets"],
        setup["teachers"]["topk"],
    )
    whole = chunked_kd_loss(hidden, weight, targets, teacher).mean_loss()
    expected = torch.autograd.grad(whole, [hidden, weight])
    parts = [
        chunked_kd_loss(hidden[a:b], weight, targets[a:b], teacher.rows(a, b)).mean_loss(total_tokens=10)
        for a, b in [(0, 3), (3, 10)]
    ]
    torch.testing.assert_close(parts[0] + parts[1], whole)
    assert_all_close(list(torch.autograd.grad(parts[0] + parts[1], [hidden, weight])), list(expected))


def test_no_grad_mode_computes_values_only() -> None:
    setup = model_setup(tokens=6, vocab=11, d=3, k=2, seed=38)
    args = (setup["hidden"], setup["weight"], setup["targets"], setup["teachers"]["topk"])
    with torch.no_grad():
        sums = chunked_kd_loss(*args)
    assert not sums.loss_sum.requires_grad
    torch.testing.assert_close(sums.loss_sum, chunked_kd_loss(*args).loss_sum.detach())


def test_bfloat16_model_gets_bfloat16_gradients_close_to_float32() -> None:
    setup = model_setup(tokens=8, vocab=40, d=16, k=4, seed=39)
    hidden = setup["hidden"].detach().bfloat16().requires_grad_(True)
    weight = setup["weight"].detach().bfloat16().requires_grad_(True)
    teacher = setup["teachers"]["topk"]
    sums = chunked_kd_loss(hidden, weight, setup["targets"], teacher, chunk_size=3)
    sums.loss_sum.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    h32, w32 = hidden.detach().float().requires_grad_(True), weight.detach().float().requires_grad_(True)
    ref = token_losses(h32 @ w32.T, setup["targets"], teacher).weighted_sum(0.5)
    ref.backward()
    torch.testing.assert_close(sums.loss_sum.float(), ref.detach(), rtol=2e-2, atol=0)
    torch.testing.assert_close(weight.grad.float(), w32.grad, rtol=5e-2, atol=5e-2)


def test_backward_twice_is_refused() -> None:
    setup = model_setup(tokens=4, vocab=9, d=3, k=2, seed=40)
    sums = chunked_kd_loss(setup["hidden"], setup["weight"], setup["targets"], setup["teachers"]["topk"])
    sums.loss_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="handed out once"):
        sums.loss_sum.backward()


# ------------------------------------------------------------------------------------------- validation


def test_config_reports_every_problem_at_once() -> None:
    with pytest.raises(ValueError) as info:
        LossSpec(divergence="kl", kd_weight=1.5, temperature=0.0, jsd_beta=-0.1, skew_alpha=1.0)  # type: ignore[arg-type]
    named = {error["loc"][0] for error in info.value.errors()}  # type: ignore[attr-defined]
    assert named == {"divergence", "kd_weight", "temperature", "jsd_beta", "skew_alpha"}
    setup = model_setup(tokens=2, vocab=5, d=3, k=2, seed=41)
    with pytest.raises(ValueError, match="chunk_size 0 must be >= 1"):
        chunked_kd_loss(
            setup["hidden"], setup["weight"], setup["targets"], setup["teachers"]["topk"], chunk_size=0
        )


def test_inputs_with_mismatched_rows_are_refused() -> None:
    setup = model_setup(tokens=5, vocab=9, d=3, k=2, seed=41)
    teacher: TopKTeacher = setup["teachers"]["topk"]
    with pytest.raises(ValueError, match="one row per supervised token"):
        chunked_kd_loss(setup["hidden"], setup["weight"], setup["targets"][:4], teacher)
    with pytest.raises(ValueError, match="k <= vocab"):
        chunked_kd_loss(
            setup["hidden"],
            setup["weight"],
            setup["targets"],
            TopKTeacher(teacher.ids, teacher.logprobs[:, :1]),
        )


def test_importing_raykd_kd_loads_no_torch() -> None:
    code = "import sys, raykd.kd; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_pure_math_modules_import_no_ray_deepspeed_or_vllm() -> None:
    """Losses, teacher signals, truncation, masks and segmentation are plain tensor/array functions: the Ray,
    DeepSpeed and vLLM layers call them, never the other way round."""
    modules = (
        "raykd.kd.divergences",
        "raykd.kd.teachers",
        "raykd.kd.losses",
        "raykd.kd.examples",
        "raykd.kd.batching",
        "raykd.truncation",
        "raykd.segments",
        "raykd.segments_text",
    )
    code = (
        f"import sys\nfor m in {modules!r}: __import__(m)\n"
        "print(sorted(m for m in ('ray', 'deepspeed', 'vllm', 'transformers') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
