"""QuantLinear: really packed, forward/backward against a float64 dense reference, nothing
full-precision saved for backward, no gradient to the base, partial groups, the dequantize
cache."""

import pytest
import torch

from quantizers import QuantLinear, dequantize_cache
from quantizers.rtn import QuantResult, rtn_quantize


def make_layer(out_features=64, in_features=160, bits=3, group_size=64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_features, in_features, generator=g)
    result = rtn_quantize(W, bits, group_size)
    b = torch.randn(out_features, generator=g) if bias else None
    return QuantLinear.from_result(result, group_size, b), result, b


def dense_reference(result: QuantResult) -> torch.Tensor:
    """W [out, in] in float64 straight from codes, scales and zeros, column by column."""
    out_features, in_features = result.codes.shape
    W = torch.empty(out_features, in_features, dtype=torch.float64)
    for c in range(in_features):
        g = int(result.g_idx[c])
        W[:, c] = (result.codes[:, c].double() - result.zeros[g].double()) * result.scales[
            g
        ].double()
    return W


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_byte_count(bits):
    out_features, in_features, group_size = 192, 576, 64
    layer, _, _ = make_layer(out_features, in_features, bits, group_size, bias=False)
    groups = in_features // group_size
    expected = (
        in_features * out_features * bits // 8  # qweight
        + groups * out_features * bits // 8  # qzeros
        + groups * out_features * 2  # fp16 scales
        + in_features * 4  # g_idx
    )
    assert layer.packed_bytes() == expected
    assert not any(p.requires_grad for p in layer.parameters())  # frozen packed storage
    assert sum(p.numel() * p.element_size() for p in layer.parameters()) == expected
    # bits/8 bytes per weight plus the overhead: 2/64 for fp16 scales at g64, bits/8/64 for
    # zeros, 4/out for g_idx: under 0.07 bytes per weight here
    assert expected / (in_features * out_features) < bits / 8 + 0.07


def test_partial_last_group_dequantizes_through_g_idx():
    layer, result, _ = make_layer(in_features=160, group_size=64)  # groups of 64, 64, 32
    packed = layer.packed_tensors()
    assert packed.scales.shape == (3, 64) and packed.qzeros.shape == (3, 64 * 3 // 32)
    assert torch.equal(packed.g_idx[:64], torch.zeros(64, dtype=torch.int32))
    assert torch.equal(packed.g_idx[128:], torch.full((32,), 2, dtype=torch.int32))
    assert torch.equal(layer.dequantize_weight().double(), dense_reference(result))
    assert torch.equal(layer.codes().long(), result.codes.long())


def test_non_monotone_g_idx_is_honoured():
    layer, result, _ = make_layer(in_features=128, group_size=32, bits=4)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(1))
    shuffled = QuantResult(result.codes, result.scales, result.zeros, result.g_idx[perm], 4)
    layer = QuantLinear.from_result(shuffled, 32)
    assert torch.equal(layer.dequantize_weight().double(), dense_reference(shuffled))


def test_forward_and_input_gradient_match_dense_float64():
    layer, result, b = make_layer()
    W = dense_reference(result)
    x = torch.randn(2, 5, 160, dtype=torch.float64, requires_grad=True)
    xf = x.detach().float().requires_grad_(True)
    y = layer(xf)
    ref = x @ W.t() + b.double()
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(ref)
    (y.double() * dy).sum().backward()
    (ref * dy).sum().backward()
    assert torch.allclose(xf.grad.double(), x.grad, rtol=1e-5, atol=1e-5)


def test_backward_saves_nothing_full_precision_and_base_gets_no_gradient():
    layer, _, _ = make_layer(out_features=128, in_features=256, bits=4, bias=False)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    floats = [t for t in saved if t.is_floating_point() and t.dtype != torch.float16]
    assert floats == [], [tuple(t.shape) for t in floats]  # no float32 weight, not even x
    assert sum(t.numel() * t.element_size() for t in saved) <= layer.packed_bytes()
    y.sum().backward()
    assert x.grad is not None
    assert all(t.grad is None and not t.requires_grad for t in layer.parameters())
    assert all(t.grad is None and not t.requires_grad for t in layer.buffers())


def test_dtype_casts_keep_fp16_scales_and_follow_input_dtype():
    layer, _, _ = make_layer()
    scales = layer.packed_tensors().scales.clone()
    layer.to(torch.bfloat16)
    now = layer.packed_tensors().scales
    assert now.dtype == torch.float16 and torch.equal(now, scales)
    assert layer.bias.dtype == torch.bfloat16
    y = layer(torch.randn(3, 160, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_dequantize_cache_gives_same_outputs_and_is_freed_on_exit():
    model = torch.nn.Sequential(
        make_layer(seed=1)[0], torch.nn.ReLU(), make_layer(64, 64, 4, 32)[0]
    )
    x = torch.randn(3, 160)
    expected = model(x)
    with dequantize_cache(model) as m:
        assert m is model
        first = model(x)
        cached = [layer._cache for layer in (model[0], model[2])]
        assert all(c is not None for c in cached)
        second = model(x)
        assert model[0]._cache is cached[0]  # dequantized once, reused
        with dequantize_cache(model):  # nesting keeps the outer cache alive
            model(x)
        assert model[0]._cache is not None
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert model[0]._cache is None and model[2]._cache is None
    assert not model[0]._caching
    assert torch.equal(model(x), expected)


def test_unpackable_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"in_features=100 cannot be packed at 3 bits.*32"):
        QuantLinear(100, 64, bits=3)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_features, group", [(256, 64), (192, 192), (160, 64)])
def test_grouped_dequantization_is_bit_identical_to_the_gather(bits, in_features, group):
    from quantizers.packing import pack_qweight, pack_qzeros
    from quantizers.quant_linear import dequantize_packed

    torch.manual_seed(bits)
    out_features, groups = 96, -(-in_features // group)
    codes = torch.randint(0, 2**bits, (out_features, in_features), dtype=torch.int32)
    zeros = torch.randint(0, 2**bits, (groups, out_features), dtype=torch.int32)
    scales = (torch.rand(groups, out_features) * 0.02 + 1e-3).half()
    g_idx = torch.arange(in_features, dtype=torch.int32) // group
    args = (pack_qweight(codes, bits), pack_qzeros(zeros, bits), scales, g_idx, bits)
    expected = (codes.t() - zeros[g_idx.long()]).float() * scales.float()[g_idx.long()]
    for dtype in (torch.float32, torch.bfloat16):
        gathered = dequantize_packed(*args, dtype)
        grouped = dequantize_packed(*args, dtype, group)  # falls back when a group is partial
        assert torch.equal(gathered, expected.to(dtype)) and torch.equal(grouped, gathered)
