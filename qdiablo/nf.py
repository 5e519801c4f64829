"""NormalFloat (NF) quantization, for the NF2-LoRA baseline (docs/math10k.md §10).

The k-bit NormalFloat levels follow QLoRA §3 (and LoftQ's NF quantizer with k bits): 2^(k-1)
positive quantiles and 2^(k-1) - 1 negative quantiles of N(0, 1), spaced between `offset` and 0.5,
plus an exact zero, normalised to [-1, 1]. k=4 gives bitsandbytes' NF4 table; k=2 gives the four
levels {-1, 0, 0.338, 1}. Each block of 64 consecutive weights (of the row-major flattened weight,
as bitsandbytes blocks) is scaled by its absolute maximum and rounded to the nearest level.

bitsandbytes has no 2-bit type, so the NF2 base is *fake*-quantized: each weight is replaced by its
dequantized NF2 value and stays a float `nn.Linear`. The model computes exactly what a packed NF2
model would; it just does not shrink in memory.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qdiablo.errors import UserError

log = logging.getLogger(__name__)

NF_OFFSET = 0.9677083  # QLoRA's offset: the midpoint of the two outermost NF4 quantiles
DEFAULT_BLOCKSIZE = 64


def nf_levels(bits: int, offset: float = NF_OFFSET) -> torch.Tensor:
    """The 2^bits NormalFloat levels, ascending, in float32, with exactly one zero."""
    if bits < 1 or bits > 8:
        raise UserError(f"NormalFloat needs 1 ≤ bits ≤ 8, got {bits}")
    half = 2 ** (bits - 1)
    p_pos = torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1]
    p_neg = torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1]
    positive = torch.special.ndtri(p_pos)
    negative = -torch.special.ndtri(p_neg)
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    values = values.sort().values
    return (values / values.max()).to(torch.float32)


def _blocks(weight: torch.Tensor, blocksize: int) -> torch.Tensor:
    """(num_blocks, blocksize) float32 view of the flattened weight, zero-padded at the end."""
    flat = weight.detach().reshape(-1).to(torch.float32)
    pad = (-flat.numel()) % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, blocksize)


def nf_quantize(
    weight: torch.Tensor, bits: int = 2, blocksize: int = DEFAULT_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [numel rounded up to blocks], absmax float32 [num_blocks]).

    Each block is scaled by its absmax and every value rounded to the nearest level (ties go to
    the lower level).
    """
    levels = nf_levels(bits).to(weight.device)
    blocks = _blocks(weight, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    midpoints = (levels[1:] + levels[:-1]) / 2
    codes = torch.bucketize(scaled.clamp(-1, 1), midpoints, right=False)
    return codes.to(torch.uint8).reshape(-1), absmax


def nf_dequantize(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    bits: int = 2,
    blocksize: int = DEFAULT_BLOCKSIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The float weight that (codes, absmax) stand for, in `shape`."""
    levels = nf_levels(bits).to(codes.device)
    values = levels[codes.long()].view(-1, blocksize) * absmax.unsqueeze(1)
    numel = 1
    for d in shape:
        numel *= d
    return values.reshape(-1)[:numel].view(*shape).to(dtype)


def nf_fake_quantize(
    weight: torch.Tensor, bits: int = 2, blocksize: int = DEFAULT_BLOCKSIZE
) -> torch.Tensor:
    """Round a weight onto the NF grid and back: what the model computes with on an NF base."""
    codes, absmax = nf_quantize(weight, bits, blocksize)
    return nf_dequantize(codes, absmax, weight.shape, bits, blocksize, dtype=weight.dtype)


def fake_quantize_model_nf(
    model: nn.Module, bits: int = 2, blocksize: int = DEFAULT_BLOCKSIZE
) -> list[str]:
    """Fake-quantize every plain nn.Linear except the output head, in place, as bitsandbytes does
    for a 4-bit load. Records the settings in `model.config.quantization_config`. Returns the
    names of the layers quantized."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module) is nn.Linear and module is not head:
                module.weight.copy_(nf_fake_quantize(module.weight, bits, blocksize))
                names.append(name)
    if not names:
        raise UserError("no nn.Linear layers to quantize to NormalFloat in this model")
    config = getattr(model, "config", None)
    if config is not None:
        config.quantization_config = {
            "quant_method": f"nf{bits}-fake",
            "bits": bits,
            "blocksize": blocksize,
            "note": "weights rounded to NormalFloat levels (absmax per block) and kept as floats",
        }
    log.info("fake-quantized %d linear layers to NF%d (absmax per %d)", len(names), bits, blocksize)
    return names
