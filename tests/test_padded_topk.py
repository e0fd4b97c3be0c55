"""A padded teacher's cached top-k (issue #14): ids past the student's rows, at generation and in the loss.

Fast: exact tensors against float64 formulas written out here (the teacher conditioned on the shared rows),
the student's forward on a batch whose top-k holds padding ids, the refusals, and the sampling settings of
a padded teacher folder. The same pair through the real stack: tests/test_padded_pair_sweep.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import Tensor

from raykd.kd import batching, step, synthetic
from raykd.kd.examples import TrialData, prepare_examples
from raykd.kd.losses import chunked_kd_loss, token_losses
from raykd.kd.model import KDStudent, check_vocab
from raykd.kd.teachers import TopKTeacher, shared_rows
from raykd.spec import DIVERGENCES, LossSpec

F64 = torch.float64
CPU = torch.device("cpu")


def logs(*probs: float) -> list[float]:
    return [math.log(p) for p in probs]


def test_shared_rows_drops_the_padding_entries_and_renormalises_the_rest() -> None:
    rows = 6
    ids = torch.tensor([[5, 1, 7, 2], [0, 6, 3, 9], [8, 9, 7, 6], [4, 3, 2, 1]])
    logprobs = torch.tensor(
        [
            logs(0.4, 0.3, 0.2, 0.05),
            logs(0.5, 0.2, 0.1, 0.1),
            logs(0.4, 0.3, 0.2, 0.1),
            logs(0.4, 0.3, 0.2, 0.1),
        ],
        dtype=F64,
    )
    cached, dropped = shared_rows(TopKTeacher(ids, logprobs), rows)
    assert cached.keep is not None
    assert cached.keep.tolist() == [[1, 1, 0, 1], [1, 0, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    # a dropped entry repeats its row's first kept id; a row with nothing left stays whole (the caller
    # leaves it out), a row with nothing past the rows is untouched
    assert cached.ids.tolist() == [[5, 1, 5, 2], [0, 0, 3, 0], [8, 9, 7, 6], [4, 3, 2, 1]]
    inf = -math.inf
    expected = [
        [*logs(0.4 / 0.8, 0.3 / 0.8), inf, math.log(0.05 / 0.8)],  # 0.2 dropped
        [math.log(0.5 / 0.7), inf, math.log(0.1 / 0.7), inf],  # 0.2 + 0.1 dropped
        [inf] * 4,
        logs(0.4, 0.3, 0.2, 0.1),
    ]
    torch.testing.assert_close(cached.logprobs[[0, 1, 3]], torch.tensor(expected, dtype=F64)[[0, 1, 3]])
    assert dropped.entries.tolist() == [1, 2, 4, 0] and dropped.empty.tolist() == [False, False, True, False]
    torch.testing.assert_close(dropped.mass, torch.tensor([0.2, 0.3, 1.0, 0.0], dtype=F64))
    # nothing past the rows: the same teacher back, no mask
    plain = TopKTeacher(ids[3:], logprobs[3:])
    assert shared_rows(plain, rows)[0] is plain


def test_the_shared_mass_is_floored_at_the_kept_mass() -> None:
    """float16 log-probs can round the dropped mass up so that 1 - dropped < kept: the kept entries then
    take the whole shared mass (log-prob <= 0), never more."""
    lp = torch.tensor([[math.log(0.9995), math.log(0.001)]]).half()
    cached, _ = shared_rows(TopKTeacher(torch.tensor([[9, 1]]), lp), 4)
    assert float(cached.logprobs[0, 1]) == pytest.approx(0.0, abs=1e-6)
    assert cached.logprobs[0, 0] == -math.inf


def conditional_kd(teacher_logits: Tensor, ids: Tensor, student_logits: Tensor) -> Tensor:
    """Forward KL over (kept ids, tail) buckets of the teacher conditioned on the student's rows, written
    out per position in float64: p_i / (1 - dropped mass) at the top-k ids below the rows, then the tail."""
    rows = student_logits.shape[-1]
    p, q = teacher_logits.double().softmax(-1), student_logits.double().softmax(-1)
    out = []
    for i in range(len(ids)):
        kept = [int(j) for j in ids[i] if j < rows]
        dropped = sum(float(p[i, j]) for j in ids[i] if j >= rows)
        pk = p[i, kept] / (1 - dropped)
        qk = q[i, kept]
        buckets_p, buckets_q = (
            torch.cat([pk, 1 - pk.sum(-1, keepdim=True)]),
            torch.cat([qk, 1 - qk.sum(-1, keepdim=True)]),
        )
        out.append((buckets_p * (buckets_p / buckets_q).log()).sum())
    return torch.stack(out)


def padded_setup(seed: int) -> tuple[Tensor, Tensor, Tensor, TopKTeacher, Tensor]:
    """A teacher with 16 rows whose 4 padding rows are boosted into its top-5, a student with 12 rows
    (hidden @ weight.T), targets. Every position keeps at least one entry; most drop some."""
    g = torch.Generator().manual_seed(seed)
    teacher_logits = torch.randn(9, 16, generator=g, dtype=F64) * 2
    teacher_logits[:, 12:] += 2.0
    hidden = torch.randn(9, 8, generator=g, dtype=F64)
    weight = torch.randn(12, 8, generator=g, dtype=F64)
    targets = torch.randint(0, 12, (9,), generator=g)
    top = teacher_logits.log_softmax(-1).topk(5, -1)
    assert (top.indices >= 12).any(-1).sum() >= 6 and (top.indices < 12).any(-1).all()
    return hidden, weight, targets, TopKTeacher(top.indices, top.values), teacher_logits


def test_topk_kd_on_a_padded_teacher_is_the_kd_against_the_teacher_over_the_shared_rows() -> None:
    hidden, weight, targets, teacher, teacher_logits = padded_setup(seed=3)
    cached, _ = shared_rows(teacher, 12)
    logits = (hidden @ weight.T).requires_grad_(True)
    losses = token_losses(logits, targets, cached, LossSpec())
    expected = conditional_kd(teacher_logits, teacher.ids, logits.detach())
    torch.testing.assert_close(losses.kd, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        losses.ce, torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    )
    # the chunked, fused loss (its gradient written out by hand) gives the same values and gradients
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    sums = chunked_kd_loss(h, w, targets, cached, LossSpec(), chunk_size=4)
    torch.testing.assert_close(sums.kd_sum, expected.sum(), rtol=1e-9, atol=1e-12)
    sums.loss_sum.backward()
    ref_h, ref_w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    token_losses(ref_h @ ref_w.T, targets, cached).weighted_sum(0.5).backward()
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_every_divergence_on_a_padded_teacher_has_finite_gradients_matching_autograd(kind: str) -> None:
    hidden, weight, targets, teacher, _ = padded_setup(seed=4)
    cached, _ = shared_rows(teacher, 12)
    config = LossSpec(divergence=kind, temperature=1.5)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    sums = chunked_kd_loss(h, w, targets, cached, config, chunk_size=4)
    sums.loss_sum.backward()
    ref_h, ref_w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref = token_losses(ref_h @ ref_w.T, targets, cached, config)
    ref.weighted_sum(0.5).backward()
    assert torch.isfinite(ref.kd).all() and torch.isfinite(w.grad).all()
    torch.testing.assert_close(sums.kd_sum, ref.kd.sum(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-9, atol=1e-12)


def test_the_loss_refuses_top_k_ids_past_its_rows() -> None:
    hidden, weight, targets, teacher, _ = padded_setup(seed=5)
    with pytest.raises(ValueError, match=r"top-k id 1[2-5] is past the student's 12 rows: restrict"):
        chunked_kd_loss(hidden, weight, targets, teacher)


def test_student_forward_drops_padding_entries_and_trains_an_all_padding_position_on_ce() -> None:
    """KDStudent on a batch whose cached top-k holds ids past its 96 rows: the loss is the KD against the
    teacher over the shared rows where an entry is left, CE only where none is; both are counted."""
    vocab, k = 96, 4
    model = synthetic.tiny_llama(vocab, hidden=64, heads=2)
    examples, _ = prepare_examples(
        synthetic.synthetic_rows(3, vocab=vocab, k=k, seed=5, prompt_logprobs=True), TrialData(0.7)
    )
    mb = batching.collate(examples, k)
    batch = step.to_device(mb, CPU)
    batch["topk_ids"][0] = torch.tensor([96, 97, 98, 99])  # nothing left: CE only
    batch["topk_ids"][1, 2] = 100  # one entry dropped
    out = KDStudent(model, LossSpec(), chunk_size=7)(**batch)
    with torch.no_grad():
        logits = model(batch["input_ids"]).logits.reshape(-1, vocab)[batch["flat_pos"]]
    teacher = TopKTeacher(batch["topk_ids"], batch["topk_logprobs"])
    lp = teacher.logprobs.double()
    assert batch["has_teacher"].all()
    cached, _ = shared_rows(teacher.select(slice(1, None)), vocab)
    ref = token_losses(logits[1:], batch["target_ids"][1:], cached)
    ce0 = torch.nn.functional.cross_entropy(logits[:1], batch["target_ids"][:1], reduction="sum")
    torch.testing.assert_close(out[0], 0.5 * (ref.ce.sum() + ref.kd.sum() + ce0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2], ref.kd.sum(), rtol=1e-5, atol=1e-5)
    assert float(out[4]) == len(logits) - 1  # KD positions
    dropped_mass = lp[0].exp().sum() + lp[1, 2].exp()
    torch.testing.assert_close(
        out[8], torch.stack([torch.tensor(5.0), dropped_mass.float(), torch.tensor(1.0)])
    )
    # the trace itself (its tokens) must fit the student: a clear error names the fix
    with pytest.raises(ValueError, match=r"token id 96, past the student's 96 embedding rows"):
        check_vocab(model, 96)
    check_vocab(model, 95)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from raykd.embedded.tokenizer import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("vocab") / "tokenizer")


def config_only(folder: Path, tokenizer_dir: Path, rows: int) -> Path:
    """A model folder as far as the vocabulary goes: its tokenizer and a config.json with ``rows``."""
    shutil.copytree(tokenizer_dir, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": rows}))
    return folder


def test_a_padded_teacher_samples_only_the_ids_its_tokenizer_holds(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    from raykd.traces.checks import teacher_rows
    from raykd.traces.pipeline import sampling_params
    from tests.test_traces import make_spec

    n = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    spec = make_spec()
    plain = teacher_rows(str(tokenizer_dir), str(config_only(tmp_path / "plain", tokenizer_dir, n)))
    assert plain is not None and plain.padding == [] and sampling_params(spec, plain) == sampling_params(spec)
    assert "logit_bias" not in sampling_params(spec) and "allowed_token_ids" not in sampling_params(spec)
    # a few padding rows: each gets a bias of -inf
    padded = config_only(tmp_path / "padded", tokenizer_dir, n + 64)
    rows = teacher_rows(str(padded), str(padded))
    assert rows is not None and rows.tokens == list(range(n)) and rows.padding == list(range(n, n + 64))
    params = sampling_params(spec, rows)
    assert (
        params["logit_bias"] == dict.fromkeys(range(n, n + 64), -math.inf)
        and "allowed_token_ids" not in params
    )
    assert params["logprobs"] == spec.generation.logprobs_k
    # more padding rows than tokens: the tokens are the shorter list
    wide = config_only(tmp_path / "wide", tokenizer_dir, 3 * n)
    params = sampling_params(spec, teacher_rows(str(wide), str(wide)))
    assert params["allowed_token_ids"] == list(range(n)) and "logit_bias" not in params
