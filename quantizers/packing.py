"""Bit packing of the GPTQ checkpoint layout (docs/formats.md §1-§3).

Integers of `bits` bits are packed into int32 words as one little-endian bit stream: value i
occupies bits [i·bits, (i+1)·bits) of the stream, word w holds stream bits [32w, 32w+32). For
2, 4 and 8 bits a word holds 16, 8 or 4 whole values; for 3 bits, 32 values fill exactly three
words and values 10 and 21 straddle a word boundary (the layout of GPTQ's 3-bit kernels).

    qweight  int32 [in·bits/32, out]   codes packed along the input dimension
    qzeros   int32 [groups, out·bits/32]  zero points packed along the output dimension

Zero-point conventions: `gptq_v2` stores the zero point as is; `gptq` (v1) stores zero − 1,
so a zero of 0 would wrap to 2^bits − 1. qdiablo keeps zeros in the v2 convention in memory and
converts when reading or writing a v1 checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF


def packable(n: int, bits: int) -> bool:
    """Whether n values of `bits` bits fill whole int32 words."""
    return (n * bits) % 32 == 0


def _chunk(bits: int) -> tuple[int, int, Tensor, Tensor]:
    """The repeating unit of the stream: (values, words, word of each value, bit shift of each
    value) — 8 values in 1 word at 4 bits, 32 values in 3 words at 3 bits."""
    words = bits // math.gcd(bits, 32)
    values = words * 32 // bits
    pos = torch.arange(values, dtype=torch.long) * bits
    return values, words, pos // 32, pos % 32


def pack_rows(values: Tensor, bits: int) -> Tensor:
    """Pack integers [n, C] (each in [0, 2^bits)) along dim 0 into int32 [n·bits/32, C]."""
    n, cols = values.shape
    if not packable(n, bits):
        raise ValueError(f"cannot pack {n} values of {bits} bits into whole int32 words")
    lo, hi = torch.aminmax(values)
    if int(lo) < 0 or int(hi) >= 2**bits:
        raise ValueError(f"values to pack must lie in [0, {2**bits - 1}], got {int(lo)}..{int(hi)}")
    per, words, word, shift = _chunk(bits)
    shift = shift.to(values.device)
    v = values.to(torch.long).reshape(n // per, per, cols)
    out = torch.zeros(n // per, words, cols, dtype=torch.long, device=values.device)
    spills = shift + bits > 32  # the value's high bits start the next word
    for w in range(words):
        mine = (word == w).to(values.device)
        out[:, w] = ((v[:, mine] << shift[mine][:, None]) & MASK32).sum(dim=1)
        carry = (word == w - 1).to(values.device) & spills
        if bool(carry.any()):
            out[:, w] += (v[:, carry] >> (32 - shift[carry])[:, None]).sum(dim=1)
    out = out.view(n * bits // 32, cols)
    return (out - ((out >> 31) << 32)).to(torch.int32)  # reinterpret uint32 as int32


def unpack_rows(packed: Tensor, bits: int, n: int | None = None) -> Tensor:
    """Inverse of `pack_rows`: int32 [W, C] -> integers [n, C] (int32), n = W·32/bits."""
    total, cols = packed.shape
    per, words, word, shift = _chunk(bits)
    word, shift = word.to(packed.device), shift.to(packed.device)
    x = packed.reshape(total // words, words, cols)
    mask = (1 << bits) - 1
    # A broadcast view when every value sits in one word (2/4/8 bits): no gathered copy.
    src = x.expand(-1, per, -1) if words == 1 else x[:, word]
    v = src >> shift.to(torch.int32)[None, :, None]  # arithmetic shift: mask below
    spills = shift + bits > 32
    if bool(spills.any()):
        s = shift[spills]
        low = v[:, spills] & ((1 << (32 - s)) - 1).to(torch.int32)[None, :, None]
        high = x[:, word[spills] + 1] << (32 - s).to(torch.int32)[None, :, None]
        v[:, spills] = low | high
    v = (v & mask).reshape(total // words * per, cols)
    return v if n is None else v[:n]


def pack_qweight(codes: Tensor, bits: int) -> Tensor:
    """Codes [out, in] -> qweight int32 [in·bits/32, out]."""
    return pack_rows(codes.t(), bits)


def unpack_qweight(qweight: Tensor, bits: int, in_features: int) -> Tensor:
    """qweight int32 [in·bits/32, out] -> codes int32 [in, out] (input-major, as stored)."""
    return unpack_rows(qweight, bits, in_features)


def pack_qzeros(zeros: Tensor, bits: int) -> Tensor:
    """Zero points [groups, out] -> qzeros int32 [groups, out·bits/32]."""
    return pack_rows(zeros.t(), bits).t().contiguous()


def unpack_qzeros(qzeros: Tensor, bits: int, out_features: int) -> Tensor:
    """qzeros int32 [groups, out·bits/32] -> zero points int32 [groups, out]."""
    return unpack_rows(qzeros.t(), bits, out_features).t()


def zeros_v2_to_v1(qzeros: Tensor, bits: int, out_features: int, name: str = "layer") -> Tensor:
    """Re-pack zero points for the v1 (`gptq`) format, which stores zero − 1.

    A zero point of 0 cannot be written in v1 (it would wrap to 2^bits − 1); that is an error
    naming the layer. qdiablo's quantizer keeps zeros ≥ 1 when the target format is v1.
    """
    z = unpack_qzeros(qzeros, bits, out_features)
    if bool((z == 0).any()):
        raise ValueError(
            f"{name}: {int((z == 0).sum())} zero points are 0, which the v1 'gptq' format "
            "cannot store (zero - 1 wraps); save with checkpoint_format='gptq_v2' or quantize "
            "with checkpoint_format='gptq', which keeps zero points >= 1"
        )
    return pack_qzeros(z - 1, bits)


def zeros_v1_to_v2(qzeros: Tensor, bits: int, out_features: int) -> tuple[Tensor, int]:
    """Read v1 zero points (stored zero − 1) into the v2 convention.

    Returns the re-packed zeros and how many stored values were 2^bits − 1: the encoding of a
    zero point of 0 that v1 wrapped. They are read back as 0 (what the quantizer meant); some
    v1 kernels read them as 2^bits instead.
    """
    stored = unpack_qzeros(qzeros, bits, out_features)
    maxq = 2**bits - 1
    wrapped = int((stored == maxq).sum())
    return pack_qzeros((stored + 1) % (maxq + 1), bits), wrapped
