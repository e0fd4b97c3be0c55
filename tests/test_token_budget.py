"""A token budget smaller than some traces (training.micro_batch_tokens): those traces still train whole, each
in a forward pass of its own, and are counted; no token is cut; and every other pass keeps no more activation
memory than one pass of `budget` tokens does.

Activation memory is measured exactly, not sampled: the bytes of the distinct tensors autograd saves for the
backward pass during a pass's forward (torch.autograd.graph.saved_tensors_hooks), weights excluded. That is
what a training step's peak grows with beyond weights, gradients and optimizer state. The Ray Train run with
a budget (metrics oversized_sequences, max_pass_tokens) is tests/test_train.py's token-budget test.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from raykd.kd.batching import collate, example_lengths, plan_epoch_tokens, plan_stats
from raykd.kd.examples import TrialData, prepare_examples
from raykd.kd.model import KDStudent
from raykd.kd.step import to_device
from raykd.kd.synthetic import synthetic_rows, tiny_llama
from raykd.spec import LossSpec

K, VOCAB, BUDGET = 4, 96, 96


def _examples(n: int, seed: int, **lengths: tuple[int, int]) -> list[Any]:
    rows = synthetic_rows(n, vocab=VOCAB, k=K, seed=seed, prompt_logprobs=True, **lengths)  # type: ignore[arg-type]
    return prepare_examples(rows, TrialData(fraction=1.0))[0]


def _saved_bytes(student: KDStudent, mb: Any) -> int:
    """Bytes autograd keeps for backward after the forward of one pass (its activations), weights excluded."""
    weights = {p.untyped_storage().data_ptr() for p in student.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = student(**to_device(mb, torch.device("cpu")))
    out[0].backward()  # the pass trains: its loss reaches the weights
    return sum(saved.values())


@pytest.fixture(scope="module")
def student() -> KDStudent:
    return KDStudent(tiny_llama(vocab=VOCAB, hidden=64, layers=2, heads=2), LossSpec()).train()


def test_traces_over_the_budget_train_whole_and_alone_and_the_rest_stay_within_it(student: KDStudent) -> None:
    # mostly short traces (several share a pass) and a few longer than the budget
    examples = _examples(24, seed=11, cot_len=(2, 40)) + _examples(4, seed=12, cot_len=(120, 200))
    lengths = example_lengths(examples)
    oversized = set(np.flatnonzero(lengths > BUDGET).tolist())
    assert 0 < len(oversized) < len(examples)  # the setting this test is about
    plan = plan_epoch_tokens(lengths, 8, micro_batch_size=4, micro_batch_tokens=BUDGET, seed=0, epoch=0)
    passes = [m for micros in plan for m in micros]

    # every trace once, whole; each oversized one alone; counted as the worker reports it
    assert sorted(i for m in passes for i in m) == list(range(len(examples)))
    assert all(len(m) == 1 for m in passes if oversized & set(m))
    assert any(len(m) > 1 for m in passes)  # the budget packs the short ones together
    assert plan_stats(plan, lengths, BUDGET).oversized_sequences == len(oversized)
    batches = [collate([examples[i] for i in m], K) for m in passes]
    assert sum(mb.forward_tokens for mb in batches) == int(lengths.sum())
    assert sum(mb.n_targets for mb in batches) == sum(len(e.target_ids) for e in examples)

    # activation memory: a within-budget pass holds at most what one budget-length trace holds
    # prompt 10 + <think> 80 </think> + answer 4 + EOS = 97 tokens; the last one is never an input
    fixed = {"prompt_len": (10, 10), "cot_len": (80, 80), "answer_len": (4, 4)}
    (reference,) = _examples(1, seed=3, **fixed)
    assert len(reference) == BUDGET
    ceiling = _saved_bytes(student, collate([reference], K))
    within = [
        _saved_bytes(student, mb) for mb, m in zip(batches, passes, strict=True) if not oversized & set(m)
    ]
    over = [_saved_bytes(student, mb) for mb, m in zip(batches, passes, strict=True) if oversized & set(m)]
    assert max(within) <= ceiling, (max(within), ceiling)
    assert min(over) > ceiling  # the measure follows the tokens: a longer pass keeps more
    # and the budget is used, not just respected: the fullest pass comes near the ceiling
    assert max(within) > 0.5 * ceiling
