"""TrainableQuantLinear: a QuantLinear's codes (a latent in code units, rounded
straight-through) and per-group scale multipliers as parameters, for block-wise reconstruction
(the parametrisation is in quantizers/reconstruct.py's docstring); packed again at the end."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from quantizers.quant_linear import QuantLinear
from quantizers.rtn import MIN_SCALE, QuantResult


def round_ste(x: Tensor) -> Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (x.round() - x).detach()


class TrainableQuantLinear(nn.Module):
    """A QuantLinear's codes and scales as trainable parameters (see the module docstring)."""

    def __init__(self, layer: QuantLinear, train_codes: bool = True, train_scales: bool = True):
        super().__init__()
        self.bits = layer.bits
        self.group_size = layer.group_size
        self.maxq = 2**layer.bits - 1
        packed = layer.packed_tensors()
        codes = layer.codes().float()
        self.latent = nn.Parameter(codes, requires_grad=train_codes)
        self.register_buffer("codes0", codes.to(torch.uint8))
        self.register_buffer("scales0", packed.scales.float())
        self.register_buffer("zeros", layer.zeros().float())
        self.register_buffer("g_idx", packed.g_idx.long())
        self.multiplier = nn.Parameter(torch.ones_like(self.scales0), requires_grad=train_scales)
        self.bias = layer.bias

    def current_codes(self) -> Tensor:
        return torch.clamp(round_ste(self.latent), 0, self.maxq)

    def current_scales(self) -> Tensor:
        """s₀·m rounded to fp16 (what the layout stores; floor MIN_SCALE), as float32."""
        s = (self.scales0 * self.multiplier.detach()).clamp(min=MIN_SCALE)
        return s.half().float()

    def weight(self, fp16_scales: bool = False) -> Tensor:
        """The dequantized weight [out, in]; fp16_scales: the scales as they will be stored."""
        s = self.current_scales() if fp16_scales else self.scales0 * self.multiplier
        g = self.g_idx
        return (self.current_codes() - self.zeros.t()[:, g]) * s.t()[:, g]

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype), bias)

    @torch.no_grad()
    def clamp_latent_(self) -> None:
        """Keep V where a step back can still move the code (clamp's gradient is 0 outside)."""
        self.latent.clamp_(-0.49, self.maxq + 0.49)

    @torch.no_grad()
    def result(self) -> QuantResult:
        codes = self.current_codes().to(torch.uint8)
        return QuantResult(
            codes, self.current_scales(), self.zeros.to(torch.int32), self.g_idx.int(), self.bits
        )

    def to_quant_linear(self) -> QuantLinear:
        return QuantLinear.from_result(self.result(), self.group_size, self.bias)
