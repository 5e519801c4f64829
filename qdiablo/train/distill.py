"""Distillation from the full-precision model: the loss KL(teacher ‖ student) over next-token
distributions (`qdiablo train --distill TEACHER`).

The teacher runs on the fly, on the same batch, under no_grad: one forward of the full-precision
model per step plus a KL exact over the whole vocabulary, and nothing to store (a distilled step
took ~1.5× a plain one on SmolLM2-135M on a CPU, where the 49k-token vocabulary is a large
share). Caching top-k teacher logits instead would save that forward only when the same text is
seen again, i.e. from the second epoch on; the runs here train one epoch or less, and a top-k
cache changes the loss (the tail of the distribution is dropped).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """Mean over the positions where `mask` is set of KL(p_teacher ‖ p_student), in nats.

    logits: [..., vocab] (any float dtype; computed in float32); mask: [...] (bool or 0/1).
    Zero exactly when the two logits are equal."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: the teacher needs the same vocabulary"
        )
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    weights = mask.to(kl.dtype)
    return (kl * weights).sum() / weights.sum().clamp(min=1.0)


def next_token_mask(attention_mask: Tensor | None, input_ids: Tensor) -> Tensor:
    """Positions whose next token is real text: logits[:, t] predicts token t + 1."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()
