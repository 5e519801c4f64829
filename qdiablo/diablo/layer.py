"""DiaBloLinear: a frozen base layer plus trainable diagonal blocks.

    y = base(x) + x · blockdiag(B₁ … B_N)        blocks: (N, in/N, out/N), zero-initialised

The base is any module with `in_features`, `out_features` and a forward: `nn.Linear`, the packed
`quantizers.QuantLinear`, or bitsandbytes' `Linear4bit`. The adapter never looks inside it, except
to read a dense weight when merging (`dense_weight`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from qdiablo.errors import UserError
from qdiablo.optional import import_bitsandbytes


def valid_num_blocks(shapes: Iterable[tuple[int, int]]) -> list[int]:
    """Every N that divides the in and out features of all these (in, out) layer shapes."""
    g = 0
    for fin, fout in shapes:
        g = math.gcd(g, math.gcd(fin, fout))
    small = [d for d in range(1, math.isqrt(g) + 1) if g % d == 0]
    return sorted(set(small + [g // d for d in small]))


def check_num_blocks(
    layers: Mapping[str, tuple[int, int]], num_blocks: int, label: str | None = None
) -> None:
    """The one rule for N without padding: it divides every layer's in and out features. The
    error names the first layer it does not divide and the N nearby that divide all of them.
    `label`: how the message names N (default "N=<n>"; the CLI says "--num-blocks <n>")."""
    for name, (fin, fout) in layers.items():
        if fin % num_blocks or fout % num_blocks:
            valid = valid_num_blocks(layers.values())
            nearby = [d for d in valid if d < num_blocks][-2:] + [
                d for d in valid if d > num_blocks
            ][:2]
            raise UserError(
                f"{label or f'N={num_blocks}'} does not divide layer '{name}' ({fin}→{fout}); "
                f"valid N nearby: {', '.join(map(str, nearby))}",
                hint="pick a valid N, target other modules, or (DiaBloConfig) indivisible='pad' "
                "to zero-pad as the reference does",
            )


def block_shape(
    in_features: int, out_features: int, num_blocks: int, indivisible: str = "error", name: str = ""
) -> tuple[int, int]:
    """(in/N, out/N), or the padded (ceil(in/N), ceil(out/N)); a clear error if N doesn't divide."""
    if indivisible == "pad" and (in_features % num_blocks or out_features % num_blocks):
        if num_blocks > max(in_features, out_features):
            raise UserError(
                f"layer '{name}': N={num_blocks} exceeds its size {in_features}×{out_features}"
            )
        return math.ceil(in_features / num_blocks), math.ceil(out_features / num_blocks)
    check_num_blocks({name: (in_features, out_features)}, num_blocks)
    return in_features // num_blocks, out_features // num_blocks


def _dropped(x: torch.Tensor, keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The adapter's input in `dtype`, zeroed where the dropout mask drops it. Masked in x's own
    dtype, then cast: the same values as casting first (masking only selects), one transient
    copy of x's size less."""
    return (x if keep is None else torch.where(keep, x, 0.0)).to(dtype)


class _BlockDiagonalMatmul(torch.autograd.Function):
    """y = drop(x) · blockdiag(s·B) for x of shape (T, N·bi), B of shape (N, bi, bo), an optional
    keep-mask (T, N·bi) of the adapter dropout and its 1/(1-p) scale s, applied to the (small)
    blocks rather than the (large) input.

    All three GEMMs are batched over the N blocks. Measured on CPU (BENCHMARKS.md), the GEMMs run
    several times faster when the token dimension T is the wide, contiguous dimension of their
    output than when a small block dimension is, so forward and dX compute the transposed
    products (N, bo, T) and (N, bi, T), reading x and dY as strided views, and transpose back
    once. dB reads both operands as views.

    Saved for backward: x itself, in its own dtype, the 1-byte mask and B, never the dropped
    input in the blocks' dtype nor the scaled blocks; backward recomputes both (elementwise
    passes, with the same roundings as the forward). The layers that read the same input (q, k
    and v read one normalised hidden state) so hold it once between them, plus a mask each,
    where a saved fp32 dropped copy per layer cost 3 × 4 bytes a value.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor | None, blocks: torch.Tensor, scale):
        t = x.shape[0]
        n, bi, bo = blocks.shape
        h_t = _dropped(x, keep, blocks.dtype).view(t, n, bi).permute(1, 2, 0)  # (N, bi, T)
        scaled = blocks if scale == 1.0 else blocks * scale
        y_t = torch.bmm(scaled.transpose(1, 2), h_t)  # (N, bo, T)
        ctx.save_for_backward(x, keep, blocks)
        ctx.scale = scale
        ctx.compute_dtype = y_t.dtype  # bf16 under autocast
        return y_t.permute(2, 0, 1).reshape(t, n * bo)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, keep, blocks = ctx.saved_tensors
        scale = ctx.scale
        t = x.shape[0]
        n, bi, bo = blocks.shape
        dtype = ctx.compute_dtype
        dy = dy.to(dtype)
        dy_t = dy.view(t, n, bo).permute(1, 2, 0)  # (N, bo, T), a view
        dx = dblocks = None
        # one transient at a time: the dropped input for dB is freed before dX is computed
        if ctx.needs_input_grad[2]:
            x_t = _dropped(x, keep, dtype).view(t, n, bi).permute(1, 2, 0)
            dblocks = torch.bmm(x_t, dy.view(t, n, bo).transpose(0, 1)).to(blocks.dtype)
            dblocks = dblocks if scale == 1.0 else dblocks * scale
            del x_t
        if ctx.needs_input_grad[0]:
            scaled = blocks if scale == 1.0 else blocks * scale
            dh = torch.bmm(scaled.to(dtype), dy_t).permute(2, 0, 1).reshape(t, n * bi)
            # masked in the compute dtype, then cast: the values the float32 detour gave
            dx = (dh if keep is None else torch.where(keep, dh, 0.0)).to(x.dtype)
        return dx, None, dblocks, None


def block_diagonal_matmul(
    x: torch.Tensor,
    blocks: torch.Tensor,
    out_features: int,
    keep: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """x · blockdiag(scale · blocks) for x of any leading shape (..., in) → (..., out), in the
    blocks' dtype; with `keep` (a bool mask shaped like x), the dropped-out input where it is
    False (dropout's 1/(1-p) goes in `scale`).

    Zero-pads the input and slices the output when the blocks are padded (indivisible='pad').
    """
    n, block_in, block_out = blocks.shape
    lead = x.shape[:-1]
    if x.shape[-1] != n * block_in:
        x = F.pad(x, (0, n * block_in - x.shape[-1]))
        if keep is not None:
            keep = F.pad(keep, (0, n * block_in - keep.shape[-1]))
    flat = x.reshape(-1, n * block_in).contiguous()
    mask = None if keep is None else keep.reshape(-1, n * block_in).contiguous()
    y = _BlockDiagonalMatmul.apply(flat, mask, blocks, float(scale))
    y = y.view(*lead, n * block_out)
    return y if n * block_out == out_features else y[..., :out_features]


def dropout_mask(x: torch.Tensor, p: float, training: bool) -> tuple[torch.Tensor | None, float]:
    """The adapter dropout's keep-mask for x (None when nothing is dropped) and the 1/(1-p) scale
    still to apply; the caller folds the scale into the (small) blocks, not the (large) input.

    On CPU the mask comes from 16-bit slices of 64-bit random words, which is several times
    faster than `torch.bernoulli`; p is then exact to 1/65536. On a GPU it is `rand >= p`.
    """
    if not training or p == 0.0:
        return None, 1.0
    if x.device.type != "cpu":
        return torch.rand(x.shape, device=x.device) >= p, 1.0 / (1.0 - p)
    count = x.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    uniform16 = words.view(torch.int16)[:count].view(x.shape)
    return uniform16 >= round(p * 65536) - 32768, 1.0 / (1.0 - p)


def adapter_dropout(x: torch.Tensor, p: float, training: bool) -> tuple[torch.Tensor, float]:
    """Dropout on the adapter input, returning (masked x, the 1/(1-p) scale still to apply):
    `dropout_mask` applied (the layer itself passes the mask to `block_diagonal_matmul`)."""
    keep, scale = dropout_mask(x, p, training)
    return (x if keep is None else torch.where(keep, x, 0.0)), scale


def dense_delta(blocks: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """Dᵀ as an (out, in) matrix, so that `W + dense_delta` is the merged weight."""
    d = torch.block_diag(*blocks)  # (N·in/N, N·out/N): D, mapping input to output
    return d[:in_features, :out_features].T


def dense_weight(base_layer: nn.Module) -> torch.Tensor:
    """The (out, in) float weight that a base layer multiplies by: the dequantized one if packed."""
    if hasattr(base_layer, "dequantize_weight"):  # quantizers.QuantLinear
        return base_layer.dequantize_weight()
    weight = getattr(base_layer, "weight", None)
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Linear4bit
        bnbf = import_bitsandbytes("bitsandbytes.functional")

        return bnbf.dequantize_4bit(weight.data, quant_state)
    if isinstance(weight, torch.Tensor) and weight.shape == (
        base_layer.out_features,
        base_layer.in_features,
    ):
        return weight
    raise UserError(f"cannot read a dense weight from {type(base_layer).__name__} to merge into")


def is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear whose weight can be edited in place (not a bitsandbytes subclass)."""
    return type(module) is nn.Linear


class DiaBloLinear(nn.Module):
    """A base linear-like layer plus zero-initialised diagonal blocks, trained in `block_dtype`."""

    def __init__(
        self,
        base_layer: nn.Module,
        num_blocks: int,
        dropout: float = 0.0,
        block_dtype: torch.dtype = torch.float32,
        indivisible: str = "error",
        name: str = "",
    ):
        super().__init__()
        for attr in ("in_features", "out_features"):
            if not isinstance(getattr(base_layer, attr, None), int):
                raise UserError(
                    f"layer '{name}' is a {type(base_layer).__name__}, which has no integer "
                    f"'{attr}': DiaBlo wraps linear layers (nn.Linear, QuantLinear, Linear4bit)",
                    hint="exclude it with exclude_modules, or target other layers",
                )
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.num_blocks = num_blocks
        self.name = name
        block_in, block_out = block_shape(
            self.in_features, self.out_features, num_blocks, indivisible, name
        )
        tensors = itertools.chain(base_layer.parameters(), base_layer.buffers())
        device = next((t.device for t in tensors), None)  # packed bases hold buffers only
        self.blocks = nn.Parameter(
            torch.zeros(num_blocks, block_in, block_out, dtype=block_dtype, device=device)
        )
        self.dropout = dropout
        self.merged = False
        self.adapter_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or not self.adapter_enabled:
            return y
        keep, scale = dropout_mask(x, self.dropout, self.training)
        return y + block_diagonal_matmul(x, self.blocks, self.out_features, keep, scale).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """Dᵀ, the (out, in) update that merging adds to the base weight."""
        return dense_delta(self.blocks.detach(), self.in_features, self.out_features)

    def merge(self) -> None:
        """Add Dᵀ into an nn.Linear base in place; packed bases must use merge_and_unload."""
        if self.merged:
            return
        if not is_plain_linear(self.base_layer):
            raise UserError(
                f"layer '{self.name}': cannot merge into a {type(self.base_layer).__name__} in "
                "place, since its weights are packed integers",
                hint="use merge_and_unload(), which returns float layers holding W_deq + Dᵀ",
            )
        w = self.base_layer.weight
        w.data += self.delta_weight().to(w.dtype)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        w.data -= self.delta_weight().to(w.dtype)
        self.merged = False

    def merged_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear holding W + Dᵀ, with W the (dequantized) weight the blocks saw."""
        if self.merged:
            self.unmerge()
        w = dense_weight(self.base_layer).detach()
        dtype = dtype or (w.dtype if w.is_floating_point() else torch.float32)
        merged = w.to(torch.float32) + self.delta_weight().to(torch.float32)
        bias = getattr(self.base_layer, "bias", None)
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None)
        out = out.to(device=w.device, dtype=dtype)
        out.weight.data.copy_(merged.to(dtype))
        if bias is not None:
            out.bias.data.copy_(bias.detach().to(dtype))
        out.weight.requires_grad_(False)
        if out.bias is not None:
            out.bias.requires_grad_(False)
        return out

    def extra_repr(self) -> str:
        n, bi, bo = self.blocks.shape
        return f"num_blocks={n}, block=({bi}, {bo}), dropout={self.dropout}, {self.blocks.dtype}"
