"""Bit packing of the GPTQ layout, against an independent big-integer bit-stream reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantizers.packing import (
    pack_qweight,
    pack_qzeros,
    pack_rows,
    unpack_qweight,
    unpack_qzeros,
    unpack_rows,
    zeros_v1_to_v2,
    zeros_v2_to_v1,
)


def reference_pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Each column as one Python integer: value i at bit i·bits; then cut into 32-bit words."""
    n, cols = values.shape
    words = n * bits // 32
    out = torch.zeros(words, cols, dtype=torch.int64)
    for c in range(cols):
        stream = 0
        for i in range(n):
            stream |= int(values[i, c]) << (i * bits)
        for w in range(words):
            out[w, c] = (stream >> (32 * w)) & 0xFFFFFFFF
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), chunks=st.integers(1, 4), cols=st.integers(1, 5))
def test_pack_matches_bitstream_reference_and_round_trips(bits, chunks, cols):
    n = chunks * 32
    g = torch.Generator().manual_seed(bits * 100 + chunks * 10 + cols)
    values = torch.randint(0, 2**bits, (n, cols), generator=g)
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (n * bits // 32, cols)
    assert torch.equal(packed, reference_pack(values, bits))
    assert torch.equal(unpack_rows(packed, bits).long(), values)


def test_3bit_values_straddle_int32_words():
    # 32 values fill three words; value 10 spans bits 30..32, value 21 spans bits 63..65.
    values = torch.zeros(32, 1, dtype=torch.long)
    values[10] = 0b111
    packed = pack_rows(values, 3).long() & 0xFFFFFFFF
    assert packed[0, 0] == 0b11 << 30  # the low two bits end word 0
    assert packed[1, 0] == 0b1  # the high bit starts word 1
    assert packed[2, 0] == 0
    values[10] = 0
    values[21] = 0b101
    packed = pack_rows(values, 3).long() & 0xFFFFFFFF
    assert packed[0, 0] == 0
    assert packed[1, 0] == 0b1 << 31  # bit 63 of the stream
    assert packed[2, 0] == 0b10  # bits 64..65
    assert torch.equal(unpack_rows(pack_rows(values, 3), 3).long(), values)


def test_all_ones_pack_to_minus_one_and_back():
    for bits in (2, 3, 4, 8):
        values = torch.full((64 if bits != 3 else 96, 3), 2**bits - 1)
        packed = pack_rows(values, bits)
        assert bool((packed == -1).all())
        assert torch.equal(unpack_rows(packed, bits).long(), values)


def test_qweight_and_qzeros_layouts():
    torch.manual_seed(0)
    out_features, in_features, groups = 64, 96, 3
    codes = torch.randint(0, 8, (out_features, in_features))
    qweight = pack_qweight(codes, 3)
    assert qweight.shape == (in_features * 3 // 32, out_features)  # packed along the input
    assert torch.equal(unpack_qweight(qweight, 3, in_features).t().long(), codes)
    zeros = torch.randint(0, 8, (groups, out_features))
    qzeros = pack_qzeros(zeros, 3)
    assert qzeros.shape == (groups, out_features * 3 // 32)  # packed along the output
    assert torch.equal(unpack_qzeros(qzeros, 3, out_features).long(), zeros)
    # Row g of qzeros is exactly the bit stream of group g's zero points.
    assert torch.equal(qzeros[1], reference_pack(zeros[1][:, None], 3)[:, 0])


def test_unpackable_sizes_and_out_of_range_values_are_errors():
    with pytest.raises(ValueError, match="cannot pack 40 values of 3 bits"):
        pack_rows(torch.zeros(40, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"must lie in \[0, 15\]"):
        pack_rows(torch.full((8, 1), 16), 4)


def test_v1_zero_convention_round_trip_and_wrap():
    zeros = torch.tensor([[1, 2, 15, 8] * 2, [3, 1, 1, 7] * 2])
    v2 = pack_qzeros(zeros, 4)
    v1 = zeros_v2_to_v1(v2, 4, 8)
    assert torch.equal(unpack_qzeros(v1, 4, 8).long(), zeros - 1)  # v1 stores zero - 1
    back, wrapped = zeros_v1_to_v2(v1, 4, 8)
    assert torch.equal(back, v2) and wrapped == 0

    with_zero = zeros.clone()
    with_zero[1, 3] = 0
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj: 1 zero points are 0.*gptq_v2"):
        zeros_v2_to_v1(pack_qzeros(with_zero, 4), 4, 8, name="layers.0.q_proj")
    # A v1 file from a tool that wrapped a zero of 0 (stored as 15) reads back as 0.
    stored = pack_qzeros(torch.where(with_zero == 0, 15, with_zero - 1), 4)
    back, wrapped = zeros_v1_to_v2(stored, 4, 8)
    assert wrapped == 1
    assert torch.equal(unpack_qzeros(back, 4, 8).long(), with_zero)
