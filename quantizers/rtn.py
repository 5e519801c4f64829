"""The integer grid shared by every quantizer, and round-to-nearest (RTN) on it.

A grid is one `scale` and one integer `zero` per (output row, group); a weight w maps to the code
q = clamp(round(w / scale) + zero, 0, 2^bits - 1) and back to scale * (q - zero). Scales are
rounded to fp16 *before* the codes are computed, because the GPTQ layout stores them in fp16: the
weights a quantizer optimises are then exactly the weights `QuantLinear` dequantizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Smallest scale we store: fp16 keeps it as a normal number, and 1/scale stays finite.
MIN_SCALE = 2.0**-14


@dataclass
class QuantResult:
    """One quantized weight matrix in the GPTQ layout's terms (before bit packing).

    codes:  int   [out, in]      integers in [0, 2^bits - 1]
    scales: fp32  [groups, out]  values exactly representable in fp16
    zeros:  int   [groups, out]  zero points as is (the gptq_v2 convention)
    g_idx:  int32 [in]           group of each input column
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    bits: int
    damp_percent: float | None = None  # GPTQ: the damping its Cholesky needed

    def dequantize(self) -> Tensor:
        """The float32 weight [out, in] these codes stand for."""
        g = self.g_idx.long()
        return (self.codes.float() - self.zeros.t()[:, g].float()) * self.scales.t()[:, g]


def find_grid(
    w: Tensor, bits: int, sym: bool, beta: float = 1.0, min_zero: int = 0
) -> tuple[Tensor, Tensor]:
    """Min-max grid of each row of `w` [rows, cols] -> (scale [rows], zero [rows]).

    The range always contains 0. `beta` < 1 shrinks the scale (MagR's reference does this after
    magnitude reduction), clamping the few largest weights. `min_zero=1` keeps asymmetric zero
    points off 0, so that the v1 checkpoint format, which stores zero - 1, cannot wrap around.
    """
    maxq = 2**bits - 1
    w = w.float()
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        amax = torch.maximum(-xmin, xmax)
        xmin, xmax = -amax, amax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (beta * (xmax - xmin) / maxq).clamp(min=MIN_SCALE).half().float()
    if sym:
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        zero = torch.round(-xmin / scale).clamp(min_zero, maxq)
    return scale, zero


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Integer codes of `w` on a grid; scale/zero broadcast against w (e.g. [rows, 1])."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def group_slices(columns: int, group_size: int) -> list[tuple[int, int]]:
    """[start, end) of each group; the last group is partial when group_size doesn't divide."""
    if group_size == -1:
        return [(0, columns)]
    return [(i, min(i + group_size, columns)) for i in range(0, columns, group_size)]


def rtn_quantize(
    W: Tensor,
    bits: int,
    group_size: int = -1,
    sym: bool = False,
    beta: float = 1.0,
    min_zero: int = 0,
) -> QuantResult:
    """Round each weight of W [out, in] to the nearest point of its group's min-max grid.

    All groups at once: the columns are zero-padded to whole groups (the grid range always
    contains 0, so the padding changes no grid) and viewed as [out, groups, group_size].
    """
    W = W.float()
    rows, cols = W.shape
    g = cols if group_size == -1 else group_size
    groups = -(-cols // g)
    Wg = torch.nn.functional.pad(W, (0, groups * g - cols)).view(rows, groups, g)
    scale, zero = find_grid(Wg.reshape(rows * groups, g), bits, sym, beta, min_zero)
    scale, zero = scale.view(rows, groups), zero.view(rows, groups)
    codes = quantize_codes(Wg, scale[..., None], zero[..., None], 2**bits - 1)
    codes = codes.reshape(rows, groups * g)[:, :cols].to(torch.uint8)
    g_idx = (torch.arange(cols, device=W.device) // g).to(torch.int32)
    return QuantResult(codes, scale.t().contiguous(), zero.t().to(torch.int32), g_idx, bits)
