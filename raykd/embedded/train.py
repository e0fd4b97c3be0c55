"""Plain-torch CPU training and greedy evaluation of the embedded teacher and student base.

No Ray, DeepSpeed or vLLM here: the models are tiny and this runs once per cache key.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from raykd.chat import chat_prompt_ids
from raykd.embedded.recipe import Recipe
from raykd.problems.answers import extract_answer, is_correct
from raykd.problems.tasks import Problem


@dataclass(frozen=True)
class Example:
    """One training sequence: chat-formatted prompt ids followed by completion ids (ending in EOS)."""

    ids: list[int]
    n_prompt: int


def encode(tokenizer: object, problem: Problem, completion: str) -> Example:
    """Tokenize one (prompt, completion) pair; the completion ends with the EOS (``<|im_end|>``) token."""
    head = chat_prompt_ids(tokenizer, problem.prompt)
    tail = tokenizer(completion, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    return Example(ids=head + list(tail) + [tokenizer.eos_token_id], n_prompt=len(head))  # type: ignore[attr-defined]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 on prompt and padding, so only the completion is learned.

    Returns input_ids, labels, attention_mask: each (batch, max_len).
    """
    width = max(len(e.ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids = torch.tensor(e.ids)
        input_ids[row, : len(ids)] = ids
        labels[row, e.n_prompt : len(ids)] = ids[e.n_prompt :]
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def train(
    model: torch.nn.Module,
    examples: Sequence[Example],
    recipe: Recipe,
    pad_id: int,
    seed: int,
    check: Callable[[torch.nn.Module], float] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Train ``model`` with AdamW on completion tokens, cycling through ``examples`` in a seeded order.

    Every ``check_every`` steps ``check(model)`` scores it; training stops once that reaches
    ``recipe.target``. Returns the steps run, the last loss and check score, and the wall time.
    """
    torch.manual_seed(seed)
    order = random.Random(seed)
    pool = list(examples)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.98))
    lr_at = _cosine(recipe)
    start, score, loss_value, step = time.perf_counter(), float("nan"), float("nan"), 0
    if check is not None:
        log(
            "check = share of held-out check problems whose whole reference completion is the model's "
            f"argmax under teacher forcing; training stops at {recipe.target:g} or step {recipe.max_steps}"
            if recipe.target <= 1
            else f"check = the same exact-match share, shown only: training runs all {recipe.max_steps} steps"
        )
    model.train()
    for step in range(1, recipe.max_steps + 1):
        batch = collate(_next_batch(pool, order, recipe.batch_size, step), pad_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if check is not None and (step % recipe.check_every == 0 or step == recipe.max_steps):
            score = check(model)
            model.train()
            seconds = time.perf_counter() - start
            log(f"step {step}/{recipe.max_steps}: loss {loss_value:.4f}, check {score:.3f}, {seconds:.0f}s")
            if score >= recipe.target:
                break
    model.eval()
    return {"steps": step, "loss": loss_value, "check": score, "seconds": time.perf_counter() - start}


def _next_batch(pool: list[Example], order: random.Random, size: int, step: int) -> list[Example]:
    # A fresh shuffle each pass over the pool, so every example is seen once per epoch.
    per_epoch = max(1, len(pool) // size)
    if (step - 1) % per_epoch == 0:
        order.shuffle(pool)
    offset = ((step - 1) % per_epoch) * size
    return pool[offset : offset + size]


def _cosine(recipe: Recipe) -> Callable[[int], float]:
    def lr_at(step: int) -> float:
        if step <= recipe.warmup_steps:
            return recipe.lr * step / max(1, recipe.warmup_steps)
        progress = (step - recipe.warmup_steps) / max(1, recipe.max_steps - recipe.warmup_steps)
        return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    return lr_at


@torch.no_grad()
def forced_exact(
    model: torch.nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 128
) -> float:
    """Share of examples whose every completion token is the model's argmax under teacher forcing.

    A lower bound on greedy accuracy that costs one forward pass: such an example decodes greedily to exactly
    the reference completion.
    """
    model.eval()
    hits = 0
    for begin in range(0, len(examples), batch_size):
        batch = collate(examples[begin : begin + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predicted, target = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
        wrong = (predicted != target) & (target != -100)
        hits += int((~wrong.any(dim=1)).sum())
    return hits / max(1, len(examples))


@torch.no_grad()
def greedy_ids(
    model: torch.nn.Module, prompts: Sequence[list[int]], max_new_tokens: int, eos_id: int, pad_id: int
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (EOS excluded), all rows at once with left padding and a KV cache.

    The same tokens as ``model.generate(do_sample=False)``, without its per-step overhead, which dominates
    for a model this small.
    """
    model.eval()
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    generated: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1).masked_fill(finished, eos_id)
        generated.append(token)
        finished |= token == eos_id
        if bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=positions,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in prompts]
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


def greedy_completions(
    model: torch.nn.Module,
    tokenizer: object,
    problems: Sequence[Problem],
    max_new_tokens: int,
    batch_size: int = 256,
) -> list[str]:
    """Greedy completions as text, special tokens kept (so ``</think>`` stays visible), EOS dropped."""
    texts = []
    for begin in range(0, len(problems), batch_size):
        heads = [chat_prompt_ids(tokenizer, p.prompt) for p in problems[begin : begin + batch_size]]
        eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id  # type: ignore[attr-defined]
        for ids in greedy_ids(model, heads, max_new_tokens, eos_id, pad_id):
            texts.append(tokenizer.decode(ids, skip_special_tokens=False))  # type: ignore[attr-defined]
    return texts


def greedy_accuracy(
    model: torch.nn.Module,
    tokenizer: object,
    problems: Sequence[Problem],
    max_new_tokens: int,
    batch_size: int = 256,
) -> float:
    """Share of ``problems`` whose greedy completion's answer (text after ``</think>``) matches exactly."""
    completions = greedy_completions(model, tokenizer, problems, max_new_tokens, batch_size)
    hits = sum(
        is_correct(extract_answer(c, "exact"), p.answer, "exact")
        for c, p in zip(completions, problems, strict=True)
    )
    return hits / max(1, len(problems))
