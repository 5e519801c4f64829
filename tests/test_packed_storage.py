"""QuantLinear's packed storage (what FSDP shards): every storage dtype holds the same bytes,
no cast path touches them, the state dict / checkpoint / adapter fingerprint stay in the GPTQ
dtypes, and forward/backward read the exact integer bits back."""

import pytest
import torch
from torch import nn

from quantizers import QuantLinear
from quantizers.quant_linear import STORAGE_DTYPES
from quantizers.rtn import rtn_quantize

FLOAT_STORAGES = [torch.bfloat16, torch.float16, torch.float32]


def make_layer(storage=torch.int32, seed=0, bits=4, group=32):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(96, 128, generator=g)
    bias = torch.randn(96, generator=g)
    return QuantLinear.from_result(rtn_quantize(W, bits, group), group, bias, storage_dtype=storage)


def packed_bits(layer: QuantLinear) -> list[torch.Tensor]:
    """The packed tensors as raw int32/int16 bits (an independent read of the storage)."""
    return [t.clone() for t in layer.packed_tensors()[:2]] + [
        layer.packed_tensors().scales.view(torch.int16).clone(),
        layer.packed_tensors().g_idx.clone(),
    ]


def assert_same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize("storage", STORAGE_DTYPES, ids=str)
def test_every_storage_dtype_holds_the_same_bytes_and_computes_the_same(storage):
    ref = make_layer()
    layer = make_layer(storage)
    assert all(p.dtype == storage and not p.requires_grad for p in layer.parameters())
    assert_same_bits(packed_bits(layer), packed_bits(ref))
    assert layer.packed_bytes() == ref.packed_bytes()
    x = torch.randn(5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), ref(x_ref)
    assert torch.equal(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    assert torch.equal(x.grad, x_ref.grad)
    assert all(p.grad is None for p in layer.parameters())


@pytest.mark.parametrize("storage", [torch.int32, *FLOAT_STORAGES], ids=str)
def test_no_cast_touches_the_packed_bytes(storage):
    """model.to(dtype), .half(), .bfloat16(), .float(), .double(), .type(), to_empty-free moves:
    the packed bytes survive each; the bias follows the model's dtype as before."""
    casts = {
        "to(bfloat16)": lambda m: m.to(torch.bfloat16),
        "to(float16)": lambda m: m.to(dtype=torch.float16),
        "half": lambda m: m.half(),
        "bfloat16": lambda m: m.bfloat16(),
        "float": lambda m: m.float(),
        "double": lambda m: m.double(),
        "type(float16)": lambda m: m.type(torch.float16),
        "to(cpu, float64)": lambda m: m.to("cpu", torch.float64),
    }
    for what, cast in casts.items():
        layer = make_layer(storage)
        before = packed_bits(layer)
        model = nn.Sequential(nn.Linear(128, 128), layer)
        cast(model)
        assert_same_bits(packed_bits(layer), before)
        assert all(p.dtype == storage for p in layer.parameters()), what
        assert layer.bias.dtype == model[0].weight.dtype, what
    layer = make_layer(storage)
    y = layer.to(torch.bfloat16)(torch.randn(2, 128, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_state_dict_is_the_gptq_layout_whatever_the_storage_and_loads_across_storages():
    ref = make_layer().state_dict()
    assert ref["qweight"].dtype == torch.int32 and ref["scales"].dtype == torch.float16
    for storage in [*FLOAT_STORAGES, torch.uint8]:
        layer = make_layer(storage)
        state = layer.state_dict()
        assert set(state) == set(ref)
        for key, t in state.items():
            assert t.dtype == ref[key].dtype and t.shape == ref[key].shape
            assert torch.equal(
                t.view(torch.int16) if t.is_floating_point() else t,
                ref[key].view(torch.int16) if t.is_floating_point() else ref[key],
            )
        # a GPTQ-layout state dict loads into float storage as bytes, never as cast values
        empty = QuantLinear(128, 96, 4, 32, bias=True, storage_dtype=storage)
        empty.load_state_dict(ref)
        assert_same_bits(packed_bits(empty), packed_bits(make_layer()))
        assert all(p.dtype == storage for p in empty.parameters())
    with pytest.raises(ValueError, match=r"qweight: got float32, expected int32"):
        QuantLinear(128, 96, 4, 32, bias=True).load_state_dict(
            {**ref, "qweight": ref["qweight"].float()}
        )


def test_set_storage_dtype_round_trips_and_bad_dtype_is_refused():
    layer = make_layer()
    before = packed_bits(layer)
    for storage in (torch.bfloat16, torch.uint8, torch.float32, torch.int32):
        layer.set_storage_dtype(storage)
        assert layer.storage_dtype == storage
        assert_same_bits(packed_bits(layer), before)
    with pytest.raises(ValueError, match=r"storage_dtype torch\.float64"):
        QuantLinear(128, 96, 4, 32, storage_dtype=torch.float64)


def test_adapter_fingerprint_is_the_one_main_computed_before_the_storage_change():
    """sha256 printed by the code before packed storage became parameters (commit a3101b4) for
    this deterministic layer: adapters trained then keep loading."""
    from qdiablo.diablo.fingerprint import base_fingerprint

    W = torch.sin(torch.arange(64 * 128, dtype=torch.float32) * 0.37).view(64, 128)
    bias = torch.cos(torch.arange(64, dtype=torch.float32))
    expected = "88a5a910bfdf361119e7b5ddb7e1390affe4df6094f16826d3d6319cd90e8d02"
    for storage in (torch.int32, torch.bfloat16, torch.float16):
        layer = QuantLinear.from_result(rtn_quantize(W, 4, 32), 32, bias, storage_dtype=storage)
        fp = base_fingerprint(nn.ModuleDict({"proj": layer}), ["proj"])
        assert fp["sha256"] == expected, storage


def test_checkpoint_bytes_do_not_depend_on_storage(tmp_path):
    """save_quantized from a bf16-stored model writes the same file as the int32 one, and
    load_quantized(storage_dtype=...) + a model.to(dtype) cast reads back the same bits."""
    from conftest import make_tiny_llama, make_tokenizer
    from safetensors.torch import load_file

    from quantizers import QuantConfig, load_quantized, quantize_model, save_quantized
    from quantizers.calibration import tokenize_calibration

    calib = tokenize_calibration(make_tokenizer(), ["Weng earns $12 an hour. " * 16] * 8, 8, 64, 4)
    model = quantize_model(make_tiny_llama(), calib, QuantConfig(bits=4, group_size=32))
    save_quantized(model, tmp_path / "int32")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.set_storage_dtype(torch.bfloat16)
    save_quantized(model, tmp_path / "bf16")
    a = load_file(tmp_path / "int32" / "model.safetensors")
    b = load_file(tmp_path / "bf16" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert a["model.layers.0.mlp.down_proj.qweight"].dtype == torch.int32
    loaded = load_quantized(tmp_path / "int32", storage_dtype=torch.float16, dtype=torch.bfloat16)
    for name, m in loaded.named_modules():
        if isinstance(m, QuantLinear):
            assert m.storage_dtype == torch.float16
            assert torch.equal(m.packed_tensors().qweight, a[f"{name}.qweight"])
            assert torch.equal(
                m.packed_tensors().scales.view(torch.int16), a[f"{name}.scales"].view(torch.int16)
            )
