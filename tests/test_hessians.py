"""Calibration Hessians stay positive semi-definite with bfloat16 forwards, and GPTQ's Cholesky
retries are reported per layer."""

import copy

import pytest
import torch
from conftest import make_tiny_llama
from test_quantize_model import calibration

from quantizers import QuantConfig, quantize_model
from quantizers.calibration import (
    block_linears,
    capture_block_inputs,
    collect_hessians,
    find_decoder_blocks,
    input_groups,
)
from quantizers.gptq import damped_inverse_cholesky
from quantizers.report import LayerReport, QuantReport


def test_float32_calibration_hessians_are_psd_grams_and_bf16_products_are_not_exact():
    model = make_tiny_llama()
    with torch.no_grad():  # an outlier input channel, as real LLMs have: a wide diagonal
        model.model.layers[0].input_layernorm.weight[3] = 300.0
    _, blocks = find_decoder_blocks(model)
    block = blocks[0]
    linears = block_linears(block, "model.layers.0")
    seen = []
    q_proj = linears["self_attn.q_proj"]
    hidden, kwargs = capture_block_inputs(model, blocks, calibration(), torch.device("cpu"))
    groups = input_groups(block, linears, hidden[0], kwargs[0])
    exact = collect_hessians(block, linears, groups[:1], hidden, kwargs)["self_attn.q_proj"]
    rounded = collect_hessians(block, linears, groups[:1], hidden, kwargs, torch.bfloat16)
    handle = q_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    with torch.no_grad():
        for h, kw in zip(hidden, kwargs):
            block(h, **kw)
    handle.remove()
    X = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).double()
    reference = X.t() @ X / X.shape[0]  # independent: float64 Gram
    scale = float(reference.diagonal().max())
    assert torch.allclose(exact.double(), reference, rtol=1e-5, atol=1e-7 * scale)
    assert float(torch.linalg.eigvalsh(exact.double())[0]) >= -1e-6 * scale
    # bf16 products: each batch's XᵀX rounded, far less exact (the Cholesky failures' cause)
    off = (rounded["self_attn.q_proj"].double() - reference).abs().max()
    assert float(off) > 100 * float((exact.double() - reference).abs().max())


def test_damped_cholesky_reports_the_damping_it_needed():
    torch.manual_seed(0)
    A = torch.randn(32, 32)
    H = A @ A.t() / 32
    shift = 0.05 * float(H.diagonal().mean())
    H -= (float(torch.linalg.eigvalsh(H)[0]) + shift) * torch.eye(32)  # min eigenvalue −shift
    _, damp = damped_inverse_cholesky(H, 0.01)
    assert damp == 0.1
    _, damp = damped_inverse_cholesky(H + shift * 2 * torch.eye(32), 0.01)
    assert damp == 0.01


def test_quantization_report_lists_cholesky_retries():
    report = QuantReport(config=QuantConfig().to_dict())
    report.layers = [
        LayerReport("a", (8, 8), damp_percent=0.01),
        LayerReport("b", (8, 8), damp_percent=1.0),
        LayerReport("c", (8, 8), damp_percent=None),
    ]
    assert [r.name for r in report.cholesky_fallbacks()] == ["b"]
    assert "Cholesky needed more damping than 0.01 on 1 of 3 layers: b (1)" in report.to_markdown()
    model = quantize_model(make_tiny_llama(), calibration(), QuantConfig(bits=4, group_size=32))
    assert all(r.damp_percent == 0.01 for r in model.quantization_report.layers)


def test_quantize_model_uses_float32_products_unless_asked_for_the_forward_dtype():
    """bf16 forward passes, float32 XᵀX by default: the same codes as an explicit float32
    product, and different ones from products rounded to bfloat16 (the old default)."""
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = 300.0
    config = QuantConfig(bits=2, group_size=32)
    runs = {
        key: quantize_model(
            copy.deepcopy(model), calibration(), config, calib_dtype=torch.bfloat16, **kw
        )
        for key, kw in {
            "default": {},
            "float32": {"product_dtype": torch.float32},
            "rounded": {"product_dtype": "calib"},
        }.items()
    }
    packed = {k: m.model.layers[0].self_attn.q_proj.packed_tensors() for k, m in runs.items()}
    same = {k: torch.equal(p.qweight, packed["default"].qweight) for k, p in packed.items()}
    assert same == {"default": True, "float32": True, "rounded": False}
    with pytest.raises(ValueError, match="product_dtype must be"):
        quantize_model(copy.deepcopy(model), calibration(), config, product_dtype="half")
