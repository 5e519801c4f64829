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
    value) — 8 values in 1 word at 4 bits, 32 values in 3 words at 3 bits. CPU tensors."""
    words = bits // math.gcd(bits, 32)
    values = words * 32 // bits
    pos = torch.arange(values, dtype=torch.long) * bits
    return values, words, pos // 32, pos % 32


def _unpack_indices(bits: int, device: torch.device) -> tuple[int, int, Tensor, Tensor, Tensor]:
    """`_chunk`'s unit built directly on `device` (tiny `arange`s: no host→device copy, no sync):
    (values, words, word of each value [values] long, its shift [values] int32, the shift of the
    next word's bits that spill into it [values] int32, clamped to 31 where nothing spills)."""
    words = bits // math.gcd(bits, 32)
    values = words * 32 // bits
    pos = torch.arange(values, dtype=torch.int32, device=device) * bits
    shift = pos % 32
    spill_shift = (32 - shift).clamp(max=31)  # ≥ bits where nothing spills: masked off below
    return values, words, (pos // 32).long(), shift, spill_shift


def pack_rows(values: Tensor, bits: int) -> Tensor:
    """Pack integers [n, C] (each in [0, 2^bits)) along dim 0 into int32 [n·bits/32, C]."""
    n, cols = values.shape
    if not packable(n, bits):
        raise ValueError(f"cannot pack {n} values of {bits} bits into whole int32 words")
    lo, hi = torch.aminmax(values)
    if int(lo) < 0 or int(hi) >= 2**bits:
        raise ValueError(f"values to pack must lie in [0, {2**bits - 1}], got {int(lo)}..{int(hi)}")
    per, words, _, shift_cpu = _chunk(bits)
    shift = shift_cpu.to(values.device)
    v = values.to(torch.long).reshape(n // per, per, cols)
    out = torch.zeros(n // per, words, cols, dtype=torch.long, device=values.device)
    # which values go to which word, decided on the host in plain integers (no device read)
    where = [(i * bits // 32, i * bits % 32) for i in range(per)]
    for w in range(words):
        mine = torch.tensor([i for i, (word, _) in enumerate(where) if word == w])
        mine = mine.to(values.device)
        out[:, w] = ((v[:, mine] << shift[mine][:, None]) & MASK32).sum(dim=1)
        carry = [i for i, (word, s) in enumerate(where) if word == w - 1 and s + bits > 32]
        if carry:  # the high bits of values that started in the word before
            c = torch.tensor(carry).to(values.device)
            out[:, w] += (v[:, c] >> (32 - shift[c])[:, None]).sum(dim=1)
    out = out.view(n * bits // 32, cols)
    return (out - ((out >> 31) << 32)).to(torch.int32)  # reinterpret uint32 as int32


def unpack_rows(packed: Tensor, bits: int, n: int | None = None) -> Tensor:
    """Inverse of `pack_rows`: int32 [W, C] -> integers [n, C] (int32), n = W·32/bits.

    Never syncs with the device and copies nothing from the host: the shifts are built on the
    packed tensor's device, and the 3-bit values that straddle two words are read with the same
    gather as the others (every value ORs in the next word's bits, which the mask drops where
    nothing spills), not with boolean indexing, whose output size the host would have to read.
    """
    total, cols = packed.shape
    per, words, word, shift, spill_shift = _unpack_indices(bits, packed.device)
    x = packed.reshape(total // words, words, cols)
    mask = (1 << bits) - 1
    if words == 1:  # 2/4/8 bits: a broadcast view, every value in one word, no gathered copy
        v = x.expand(-1, per, -1) >> shift[None, :, None]  # arithmetic shift: masked below
    else:  # 3 bits: value i reads word[i] and, where it spills, word[i] + 1
        low_bits = (((1 << (32 - shift.long())) - 1) & MASK32).to(torch.int32)  # -1 at shift 0
        v = x[:, word] >> shift[None, :, None]
        v &= low_bits[None, :, None]
        nxt = (word + 1).clamp(max=words - 1)
        v |= x[:, nxt] << spill_shift[None, :, None]
    v &= mask
    v = v.reshape(total // words * per, cols)
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


def dequantize_packed(
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor,
    bits: int,
    dtype: torch.dtype = torch.float32,
    group: int | None = None,
) -> Tensor:
    """The weight transposed, [in, out], as `dtype`: scales[g]·(q − zeros[g]) for each input
    row's group g = g_idx[row]. Computed in float32 (exact: small integers times fp16 scales),
    then cast once.

    `group`: the group size when g_idx is plain `row // group` (no act-order). Rows then come in
    contiguous groups, and q·s − z·s is a broadcast pass instead of two gathers of [in, out];
    every product is exact in float32, so the result is bit-identical.

    No device sync and no host→device copy (training dequantizes every packed layer two or three
    times a step): see `unpack_rows`.
    """
    in_features = g_idx.shape[0]
    out_features = scales.shape[1]
    q = unpack_qweight(qweight, bits, in_features)
    z = unpack_qzeros(qzeros, bits, out_features)
    groups = scales.shape[0]
    # In place after the one int32 → float32 conversion, so the transient peak is the codes plus
    # the float weight (8 bytes a weight), then the cast; every value is exact either way.
    if group is not None and group * groups == in_features:
        s = scales.float().unsqueeze(1)  # [G, 1, out]
        zs = z.float().unsqueeze(1) * s
        w = q.view(groups, group, out_features).float()
        del q
        w = w.mul_(s).sub_(zs).view(in_features, out_features)
    else:
        g = g_idx.long()
        q = q.sub_(z.index_select(0, g)) if q.is_contiguous() else q - z.index_select(0, g)
        w = q.float()
        del q
        w.mul_(scales.float().index_select(0, g))
    return w if dtype == torch.float32 else w.to(dtype)
