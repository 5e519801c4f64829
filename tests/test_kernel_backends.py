"""A kernel is one registration: a toy backend defined in this file alone (a plain-torch
dequantize-matmul in float64, CPU float32 only) is picked by the `auto` rule where it is the
only backend that can run, passes the first-use self-check, runs QuantLinear's forward and
backward, and a wrong one is caught by the self-check and sent to the torch path.

docs/architecture.md's recipe "add a kernel" points here."""

from __future__ import annotations

import logging

import pytest
import torch

from quantizers import QuantLinear, dequantize_packed, kernels
from quantizers.kernels import selfcheck
from quantizers.kernels.backends import KernelBackend, register_backend, unregister_backend
from quantizers.rtn import rtn_quantize

K, N = 96, 64


def plain_forward(x, qweight, qzeros, scales, g_idx, bits, bias=None, group=None):
    calls.append("fwd")
    w = dequantize_packed(qweight, qzeros, scales, g_idx, bits, torch.float64, group)
    y = (x.double() @ w).to(x.dtype)
    return y if bias is None else y + bias.to(y.dtype)


def plain_backward_input(dy, qweight, qzeros, scales, g_idx, bits, group=None):
    calls.append("dx")
    w = dequantize_packed(qweight, qzeros, scales, g_idx, bits, torch.float64, group)
    return (dy.double() @ w.t()).to(dy.dtype)


calls: list[str] = []


def _backend(name: str, forward=plain_forward) -> KernelBackend:
    return KernelBackend(
        name=name,
        forward=forward,
        backward_input=plain_backward_input,
        bits=(2, 3, 4),
        devices=("cpu",),
        dtypes=(torch.float32,),
    )


@pytest.fixture
def toy(monkeypatch, caplog):
    """The toy registered, `auto` mode, the self-check on for CPU tensors; all undone after."""
    monkeypatch.delenv("QDIABLO_KERNEL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # Triton then cannot take CPU tensors
    monkeypatch.setattr(selfcheck, "ON_CPU", True)
    kernels.set_kernel(None)
    selfcheck._verdicts.clear()
    calls.clear()
    caplog.set_level(logging.INFO, logger="quantizers.kernels")
    backend = register_backend(_backend("plain"))
    yield backend
    unregister_backend("plain")
    unregister_backend("plain-wrong")
    selfcheck._verdicts.clear()
    kernels.set_kernel(None)


def _layer(bits=4, group=32, bias=True) -> QuantLinear:
    torch.manual_seed(0)
    result = rtn_quantize(torch.randn(N, K) * 0.05, bits, group)
    return QuantLinear.from_result(result, group, torch.randn(N) * 0.1 if bias else None)


def _torch_path(layer, x):
    """The reference: the float32 dequantized weight, through autograd."""
    x = x.clone().requires_grad_(True)
    w = layer.dequantize_weight()
    y = x @ w.t() + layer.bias.float()
    y.sum().backward()
    return y.detach(), x.grad


def test_auto_picks_the_only_backend_that_runs_and_its_selfcheck_passes(toy, caplog):
    x = torch.randn(5, K)
    assert (
        kernels.select(x, 4) == "plain"
    )  # Triton cannot take a CPU tensor without its interpreter
    assert kernels.select(x.double(), 4) == "torch"  # the toy declares float32 only
    assert kernels.select(x, 8) == "torch"  # ... and 2-4 bits
    layer = _layer()
    want_y, want_dx = _torch_path(layer, x)
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    y.sum().backward()
    assert calls.count("fwd") == 2 and calls.count("dx") == 2  # the self-check's, then the layer's
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xg.grad, want_dx, rtol=1e-5, atol=1e-5)
    verdicts = {k: v for k, v in selfcheck._verdicts.items() if k[0] == "plain"}
    assert sorted(k[1] for k in verdicts) == ["dx", "fwd"] and all(verdicts.values())
    logged = [r.getMessage() for r in caplog.records]
    assert any("plain kernels (QDIABLO_KERNEL=auto)" in m for m in logged)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_choice_is_cached_and_a_registration_clears_it(toy, monkeypatch):
    decisions = []
    real = kernels._select
    monkeypatch.setattr(kernels, "_select", lambda *a: decisions.append(a) or real(*a))
    x = torch.randn(3, K)
    for _ in range(5):
        assert kernels.select(x, 4) == "plain"
    assert len(decisions) == 1
    unregister_backend("plain")
    assert kernels.select(x, 4) == "torch" and len(decisions) == 2
    with pytest.raises(ValueError, match="expected one of auto, torch, triton"):
        kernels.set_kernel("plain")


def test_a_wrong_backend_fails_its_selfcheck_and_the_torch_path_runs(toy, caplog):
    def wrong(x, qweight, qzeros, scales, g_idx, bits, bias=None, group=None):
        y = plain_forward(x, qweight, qzeros, scales, g_idx, bits, bias, group)
        return y + scales[0].to(y.dtype)  # W off by one code step in every column

    unregister_backend("plain")
    register_backend(_backend("plain-wrong", forward=wrong))
    layer = _layer(bias=False)
    x = torch.randn(4, K)
    kernels.set_kernel("torch")
    want = layer(x)
    kernels.set_kernel("auto")
    assert kernels.select(x, 4) == "plain-wrong"
    assert torch.equal(layer(x), want) and torch.equal(layer(x), want)
    assert calls.count("fwd") == 1  # only the self-check ran the wrong kernel
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "plain-wrong" in warning and "relative error" in warning and "torch path" in warning
    kernels.set_kernel("plain-wrong")  # forced: a failed variant is an error
    selfcheck._verdicts.clear()
    with pytest.raises(RuntimeError, match=r"plain-wrong.*failed its self-check"):
        layer(x)
    kernels.set_kernel("plain-wrong")
    with pytest.raises(RuntimeError, match="the plain-wrong kernels cannot run: dtype"):
        kernels.select(x.double(), 4)
