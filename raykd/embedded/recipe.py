"""How an embedded model is shaped (`ModelSize`) and trained (`Recipe`), and the one builder of a fresh
Llama decoder (`new_llama`) that the embedded default and the synthetic KD test models share.

Light: dataclasses only; transformers is imported inside `new_llama`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelSize:
    """A Llama decoder's shape; head_dim = hidden / heads must stay >= 32 for vLLM's CPU attention."""

    layers: int
    hidden: int = 128
    heads: int = 4
    intermediate: int = 512


@dataclass(frozen=True)
class Recipe:
    """How to train one model (`raykd.embedded.train.train`): steps, batch, learning rate with warmup and a
    cosine decay, and when to stop early (once the check every ``check_every`` steps reaches ``target``)."""

    max_steps: int
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 30
    check_every: int = 50
    target: float = 0.97


def new_llama(size: ModelSize, vocab: int, eos: int | None, pad: int | None, max_positions: int) -> Any:
    """A freshly initialised float32 LlamaForCausalLM (untied embeddings, no BOS) from torch's current RNG."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=max_positions,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    return LlamaForCausalLM(config).float()
