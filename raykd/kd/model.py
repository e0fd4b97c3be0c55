"""The student and teacher as KD training runs them: hidden states at the supervised positions, the lm_head
weight, the chunked loss wrapped in a module DeepSpeed can train, loading, and the FLOPs formula's shape.

Torch and transformers only (DeepSpeed just for its ZeRO-3 hooks, imported where they are registered).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from raykd.kd.losses import CHUNK_SIZE, chunked_kd_loss
from raykd.kd.teachers import TeacherHead, TopKTeacher, shared_rows
from raykd.spec import LossSpec


def decoder(model: nn.Module) -> nn.Module:
    """The transformer body of a Hugging Face causal LM (LlamaModel inside LlamaForCausalLM, ...)."""
    body = getattr(model, model.base_model_prefix, None)
    if body is None or body is model:
        raise ValueError(f"{type(model).__name__} has no separate base model to take hidden states from")
    return body


def lm_head_weight(model: nn.Module) -> nn.Parameter:
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("the lm_head has a bias; the chunked loss supports logits = hidden @ weight.T only")
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(model.config, name, None) not in (None, 1.0):
            raise ValueError(f"config.{name} rescales logits; the chunked loss supports plain lm_heads only")
    return head.weight


def supervised_hidden(body: nn.Module, input_ids: Tensor, flat_pos: Tensor) -> Tensor:
    """Final hidden states at the supervised positions. input_ids: (B, L), flat_pos: (N,) -> (N, d)."""
    hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, L, d), after the final norm
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_pos)


class KDStudent(nn.Module):
    """The student as DeepSpeed sees it: forward(batch) -> the loss sums of `chunked_kd_loss`.

    Returns a tuple of tensors (DeepSpeed attaches its ZeRO-3 backward hooks to tensors in tuples):
    (loss_sum, ce_sum, kd_sum, topk_mass_sum, kd_tokens, segment_ce (3,), segment_kd (3,), segment_tokens
    (3,), dropped (3,)). dropped: what the cached teacher lost to the student's rows (`shared_rows`), over
    the positions with a teacher: top-k entries past the rows, the teacher's mass on them, and positions
    left with no entry, which train on CE only (zeros for an online teacher).
    """

    def __init__(self, model: nn.Module, loss: LossSpec, chunk_size: int = CHUNK_SIZE):
        super().__init__()
        self.model = model
        self.loss = loss
        self.chunk_size = chunk_size
        lm_head_weight(model)  # fail early on heads the chunked loss cannot take

    def register_zero3(self) -> None:
        """Under ZeRO-3 the lm_head weight is read here, outside the lm_head's own forward: tell DeepSpeed."""
        import deepspeed

        deepspeed.zero.register_external_parameter(self, lm_head_weight(self.model))

    def forward(
        self,
        input_ids: Tensor,
        flat_pos: Tensor,
        target_ids: Tensor,
        segment: Tensor,
        topk_ids: Tensor,
        topk_logprobs: Tensor,
        has_teacher: Tensor,
        teacher_hidden: Tensor | None = None,
        teacher_weight: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        hidden = supervised_hidden(decoder(self.model), input_ids, flat_pos)
        weight = lm_head_weight(self.model)
        if teacher_hidden is not None:
            weight, teacher_weight = shared_vocabulary(weight, teacher_weight)
            teacher = TeacherHead(teacher_hidden, teacher_weight)
            sums = chunked_kd_loss(hidden, weight, target_ids, teacher, self.loss, segment, self.chunk_size)
            return (*_as_tuple(sums, sums.n_tokens), torch.zeros(3, device=hidden.device))
        cached, dropped = shared_rows(TopKTeacher(topk_ids, topk_logprobs), _rows(weight))
        # Counted over the positions with a teacher (the others hold a placeholder row).
        seen = [dropped.entries * has_teacher, dropped.mass * has_teacher, dropped.empty & has_teacher]
        counts = torch.stack([x.sum().float() for x in seen])
        has_teacher = has_teacher & ~dropped.empty
        if bool(has_teacher.all()):
            sums = chunked_kd_loss(hidden, weight, target_ids, cached, self.loss, segment, self.chunk_size)
            return (*_as_tuple(sums, sums.n_tokens), counts)
        return (*self._split_forward(hidden, weight, target_ids, segment, cached, has_teacher), counts)

    def _split_forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        target_ids: Tensor,
        segment: Tensor,
        teacher: TopKTeacher,
        has_teacher: Tensor,
    ) -> tuple[Tensor, ...]:
        """Targets without cached teacher rows (prompt targets of traces without prompt logprobs, positions
        whose top-k lies past the student's rows): their loss is (1 - λ)·CE, the KD term is absent."""
        t, s = has_teacher.nonzero().squeeze(-1), (~has_teacher).nonzero().squeeze(-1)
        kd = chunked_kd_loss(
            hidden[t], weight, target_ids[t], teacher.select(t), self.loss, segment[t], self.chunk_size
        )
        # kd_weight = 0 makes loss_sum plain CE; the teacher passed is a placeholder the CE never reads.
        ce_only = self.loss.model_copy(update={"kd_weight": 0.0})
        placeholder = TopKTeacher(target_ids[s, None], torch.zeros_like(teacher.logprobs[s, :1]))
        ce = chunked_kd_loss(
            hidden[s], weight, target_ids[s], placeholder, ce_only, segment[s], self.chunk_size
        )
        return (
            kd.loss_sum + (1.0 - self.loss.kd_weight) * ce.loss_sum,
            kd.ce_sum + ce.ce_sum,
            kd.kd_sum,
            kd.topk_mass_sum,
            torch.tensor(float(kd.n_tokens)),
            kd.segment_ce_sum + ce.segment_ce_sum,
            kd.segment_kd_sum,
            kd.segment_tokens + ce.segment_tokens,
        )


def _as_tuple(sums: Any, kd_tokens: int) -> tuple[Tensor, ...]:
    return (
        sums.loss_sum,
        sums.ce_sum,
        sums.kd_sum,
        sums.topk_mass_sum,
        torch.tensor(float(kd_tokens)),
        sums.segment_ce_sum,
        sums.segment_kd_sum,
        sums.segment_tokens,
    )


class OnlineTeacher:
    """A frozen teacher run per micro-batch for exact full-vocabulary KD; not part of the DeepSpeed engine."""

    def __init__(self, model: nn.Module):
        self.model = model.eval().requires_grad_(False)
        self.body = decoder(model)
        self.weight = lm_head_weight(model)

    @torch.no_grad()
    def hidden(self, input_ids: Tensor, flat_pos: Tensor) -> Tensor:
        """(N, d_teacher) final hidden states at the supervised positions; logits are made per chunk later."""
        return supervised_hidden(self.body, input_ids, flat_pos)


def shared_vocabulary(student_weight: Tensor, teacher_weight: Tensor) -> tuple[Tensor, Tensor]:
    """Both lm_heads cut to the rows they share. student_weight: (V_s, d), teacher_weight: (V_t, d_t).

    One tokenizer, two embedding sizes (padding rows past the tokenizer, e.g. 152064 vs 151936): row i is
    the same token in both only below min(V_s, V_t) (raykd.traces.checks.check_vocabulary saw to that), so
    the online KD compares the two distributions over those rows. Slicing is a view: gradients reach the
    student's own rows.
    """
    rows = min(student_weight.shape[0], teacher_weight.shape[0])
    return student_weight[:rows], teacher_weight[:rows]


def check_vocab(student: nn.Module, max_token_id: int | None) -> None:
    """A clear error, before any step, when the traces' token ids (prompts and completions) cannot index the
    student's embedding. The tokenizers were compared on the driver, and generation samples only ids the
    teacher's tokenizer holds (`raykd.traces.pipeline.sampling_params`), so this finds traces made otherwise.
    Cached top-k ids past the student's rows are a padded teacher's and are dropped by the loss
    (`raykd.kd.teachers.shared_rows`)."""
    rows = _rows(student.get_input_embeddings().weight)
    if max_token_id is not None and max_token_id >= rows:
        raise ValueError(
            f"the traces hold token id {max_token_id}, past the student's {rows} embedding rows: they were "
            "sampled from a teacher padding row or another vocabulary; delete their folder under "
            "output.dir/traces and run the sweep again to generate them with this teacher and tokenizer"
        )


def load_student(
    folder: str, dtype: torch.dtype, config: dict[str, Any], trust_remote_code: bool = False
) -> nn.Module:
    """The student from a Hugging Face folder, in `dtype` from the start (bf16 on GPU: no fp32 copy first).

    Under ZeRO-3 the weights are partitioned while they load (transformers runs `deepspeed.zero.Init` when a
    `HfDeepSpeedConfig` of stage 3 is alive): no rank ever holds the whole model. transformers keeps only a
    weak reference to that object, so the zero.Init context ends with this function, before any other model
    (an online teacher) loads. `config` is the `ds_config` the engine will be built with.
    """
    from transformers import AutoModelForCausalLM

    load = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if config["zero_optimization"]["stage"] != 3:
        return AutoModelForCausalLM.from_pretrained(folder, **load)
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = HfDeepSpeedConfig(config)  # noqa: F841  (alive during from_pretrained, weakly referenced)
    return AutoModelForCausalLM.from_pretrained(folder, **load)


def load_teacher(
    folder: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool
) -> OnlineTeacher:
    """The online teacher, whole on this worker's device: load it before the student, outside the student's
    ZeRO-3 init (`load_student`), so that it is never partitioned."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    return OnlineTeacher(model.to(device))


def enable_checkpointing(model: nn.Module) -> None:
    """Gradient checkpointing of every decoder layer: each layer's activations are recomputed in the backward
    pass, so a step holds one layer's activations (plus every layer's input) instead of all of them."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"{type(model).__name__} does not support gradient checkpointing; set "
            "training.gradient_checkpointing: false"
        )
    # Non-reentrant checkpointing: works with inputs that need no grad (token ids) and with ZeRO-3's hooks.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs formula needs. body_params: parameters outside the embeddings and lm_head."""

    body_params: int
    vocab: int
    hidden: int
    layers: int
    attn_dim: int  # heads x head_dim: the width of Q·Kᵀ and attention·V

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape:
        c = model.config
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        total = sum(_numel(p) for p in model.parameters())
        outside = _numel(embed) + (0 if head is embed else _numel(head))
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(
            total - outside,
            _rows(head),
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads * head_dim,
        )

    def forward_flops(self, forward_tokens: int, supervised_tokens: int, sq_len_sum: int) -> float:
        """Forward FLOPs (2 per multiply-add), padding excluded:

            2·N_body·T  +  2·V·d·S  +  2·n_layers·a·Σ L(L+1)

        T forwarded tokens, S supervised tokens (the vocabulary projection runs only there), and causal
        attention: Q·Kᵀ and attention·V each cost L(L+1)/2 dot products of width a per layer. A training step
        costs 3x its forward (backward = 2x), so student FLOPs = 3 x this; the online teacher adds 1 x its
        own.
        """
        return 2.0 * (
            self.body_params * forward_tokens
            + self.vocab * self.hidden * supervised_tokens
            + self.layers * self.attn_dim * sq_len_sum
        )


def _rows(p: Tensor) -> int:
    return int(getattr(p, "ds_shape", p.shape)[0])  # ZeRO-3 partitions keep the full shape in ds_shape


def _numel(p: Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitions leave p.numel() == 0
