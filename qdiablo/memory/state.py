"""The memory a training run holds whatever its batch: the frozen base, the adapter, its
gradients and AdamW's two moments, summed tensor by tensor over the model built on the meta
device, per process under FSDP2 (which shards each tensor along dim 0). QLoRA's counterpart
(bitsandbytes NF4 + PEFT LoRA at a rank) comes from the same layer shapes.

One source for `qdiablo plan` and `benchmarks/fsdp_memory_plan.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from qdiablo.adapters.budget import lora_parameters


def shard_bytes(t: torch.Tensor, ranks: int = 1) -> int:
    """Bytes one process holds of `t` under FSDP2 (dim-0 sharding, the largest shard)."""
    if t.dim() == 0:
        return t.element_size()
    rows = math.ceil(t.shape[0] / ranks)
    return rows * (t.numel() // t.shape[0]) * t.element_size()


@dataclass(frozen=True)
class StateBytes:
    """Bytes per process of what a training step keeps from start to end."""

    packed: int  # QuantLinear's packed tensors (codes, zeros, fp16 scales, g_idx)
    other: int  # float parameters: embeddings, norms, head (and unpacked linears of an fp base)
    adapter: int  # the trainable parameters (fp32 masters)
    buffers: int = 0  # rotary tables, packed layers' biases

    @property
    def grads(self) -> int:
        return self.adapter

    @property
    def adamw(self) -> int:
        return 2 * self.adapter  # exp_avg and exp_avg_sq, in the parameters' dtype

    @property
    def base(self) -> int:
        return self.packed + self.other + self.buffers

    @property
    def total(self) -> int:
        return self.base + self.adapter + self.grads + self.adamw


def state_bytes(model: nn.Module, ranks: int = 1) -> StateBytes:
    """Sum the model's tensors (parameters and buffers: rotary tables, packed biases)."""
    from quantizers import QuantLinear

    packed_ids = {
        id(t) for m in model.modules() if isinstance(m, QuantLinear) for t in m.parameters()
    }
    packed = other = adapter = 0
    for p in model.parameters():
        n = shard_bytes(p, ranks)
        if id(p) in packed_ids:
            packed += n
        elif p.requires_grad:
            adapter += n
        else:
            other += n
    buffers = sum(shard_bytes(b, ranks) for b in model.buffers())
    return StateBytes(packed, other, adapter, buffers)


def nf4_base_bytes(weights: int, ranks: int = 1) -> float:
    """bitsandbytes NF4 with double quantization: 1/2 byte a weight, an 8-bit absmax per 64
    weights and an fp32 per 256 such blocks."""
    return (weights / 2 + weights / 64 + 4 * weights / (64 * 256)) / ranks


def lora_state_bytes(shapes: list[tuple[int, int]], rank: int, ranks: int = 1) -> float:
    """LoRA A and B in fp32, their gradients and AdamW's two moments (4 copies)."""
    return 4 * 4 * lora_parameters(shapes, rank) / ranks
