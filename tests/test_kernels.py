"""The fused Triton kernels against the torch path (dequantize_packed + matmul, and
_QuantMatmul's backward), for every bit width, group size, act-order and dtype.

On CPU (CI) they run under Triton's interpreter. Triton reads TRITON_INTERPRET when it is first
imported (tl.zeros and its other library functions are decorated then), and in a whole test run
transformers, PEFT and bitsandbytes import it long before this module. So:
  - `TRITON_INTERPRET=1 pytest tests/test_kernels.py` runs the interpreter tests in process;
  - otherwise `test_interpreter_suite_in_subprocess` runs them in a child pytest with
    TRITON_INTERPRET=1 set from the start, and they skip here (pointing at it).
Shapes
are small, with K, N multiples of 32 (3-bit packing) but not of the interpreter's 64-wide tiles,
and M in {1, 3, 17}: the split-K GEMV (M ≤ 8) and the GEMM, with ragged edges everywhere.
The GPU tests (bf16 included, larger shapes) run only where CUDA is available.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from quantizers import QuantLinear, dequantize_packed, kernels
from quantizers.rtn import QuantResult, rtn_quantize

# The interpreter computes masked-off lanes on uninitialised numpy memory before tl.where drops
# them; numpy may warn about a NaN there. The results are checked below.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

ROOT = Path(__file__).resolve().parents[1]
QMM = kernels.triton_module()
INTERPRETED = QMM is not None and QMM.INTERPRETED
cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU, triton compiled"
)


@pytest.fixture
def interpret():
    """Triton forced, under the interpreter: the kernel module."""
    if not INTERPRETED:
        pytest.skip("triton was imported without TRITON_INTERPRET=1: see the subprocess test")
    kernels.set_kernel("triton")
    yield QMM
    kernels.set_kernel(None)


@pytest.fixture
def compiled():
    """Triton forced and compiled for the GPU."""
    kernels.set_kernel("triton")
    yield QMM
    kernels.set_kernel(None)


def test_interpreter_suite_in_subprocess():
    """The interpreter tests below, in a child pytest where triton starts interpreted."""
    if INTERPRETED:
        pytest.skip("running in process: TRITON_INTERPRET=1 was set before triton's import")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    cmd += ["-k", "interpreter and not subprocess"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]


def make_layer(
    in_features: int,
    out_features: int,
    bits: int,
    group_size: int,
    act_order: bool,
    bias: bool = False,
    seed: int = 0,
    device: str = "cpu",
) -> QuantLinear:
    """An RTN-quantized layer; act-order permutes g_idx (a non-monotone group map)."""
    g = torch.Generator().manual_seed(seed)
    result = rtn_quantize(torch.randn(out_features, in_features, generator=g), bits, group_size)
    if act_order:
        perm = torch.randperm(in_features, generator=g)
        result = QuantResult(result.codes, result.scales, result.zeros, result.g_idx[perm], bits)
    b = torch.randn(out_features, generator=g) if bias else None
    return QuantLinear.from_result(result, group_size, b).to(device)


def torch_path(layer: QuantLinear, x: torch.Tensor, dy: torch.Tensor):
    """Y and dX from the torch path (the reference the kernels must match)."""
    kernels.set_kernel("torch")
    try:
        x = x.detach().requires_grad_(True)
        y = layer(x)
        y.backward(dy)
    finally:
        kernels.set_kernel("triton")
    return y.detach(), x.grad


def kernel_path(layer: QuantLinear, x: torch.Tensor, dy: torch.Tensor):
    x = x.detach().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal up to accumulation order: relative to the output's scale, fp32 ~1e-5, half ~1e-2
    (both paths round the dequantized weight to the activation dtype, then accumulate)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = want.float().abs().max().clamp_min(1.0)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    err = (got.float() - want.float()).abs().max()
    assert err <= tol * scale, f"max error {err:.3g} > {tol:.0e}·{scale:.3g}"


# --- the interpreter (CPU, CI) ---------------------------------------------------------------

K, N = 160, 96  # 5 and 3 words of 32 values: 3-bit fields straddle words at rows 10, 21, ...


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act"])
@pytest.mark.parametrize("group_size", [-1, 48, 64])  # per-channel; not a power of 2; partial
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_interpreter_matches_torch_path(interpret, bits, group_size, act_order, dtype, m):
    layer = make_layer(K, N, bits, group_size, act_order, bias=m == 3)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, K, generator=g).to(dtype)
    dy = torch.randn(m, N, generator=g).to(dtype)
    y_ref, dx_ref = torch_path(layer, x, dy)
    y, dx = kernel_path(layer, x, dy)
    assert_close(y, y_ref, dtype)
    assert_close(dx, dx_ref, dtype)


def test_interpreter_8bit_and_3d_input(interpret):
    """8-bit (4 values a word) and a (batch, seq, features) input through autograd."""
    layer = make_layer(K, N, 8, 32, act_order=False, bias=True)
    x = torch.randn(2, 5, K)
    dy = torch.randn(2, 5, N)
    y_ref, dx_ref = torch_path(layer, x, dy)
    y, dx = kernel_path(layer, x, dy)
    assert_close(y, y_ref, torch.float32)
    assert_close(dx, dx_ref, torch.float32)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kernels_equal_dense_product_exactly_in_fp32(interpret, bits):
    """The raw launchers against dequantize_packed: with integer-valued activations every
    product and partial sum is exact in fp32, so any unpacking slip shows as a mismatch."""
    layer = make_layer(K, N, bits, 32, act_order=True)
    w = dequantize_packed(*layer.packed_tensors(), bits)
    bufs = (*layer.packed_tensors(), bits)
    x = torch.randint(-2, 3, (9, K)).float()
    ref = (x.double() @ w.double()).float()
    assert torch.allclose(interpret.forward(x, *bufs), ref, rtol=1e-6, atol=1e-4)
    assert torch.allclose(interpret.forward(x[:2], *bufs), ref[:2], rtol=1e-6, atol=1e-4)
    dy = torch.randint(-2, 3, (9, N)).float()
    ref_dx = (dy.double() @ w.double().t()).float()
    assert torch.allclose(interpret.backward_input(dy, *bufs), ref_dx, rtol=1e-6, atol=1e-4)


# --- dispatch ---------------------------------------------------------------------------------


def test_auto_uses_torch_on_cpu_and_logs_once(monkeypatch, caplog):
    monkeypatch.delenv("QDIABLO_KERNEL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernels.set_kernel(None)
    kernels._logged.clear()
    x = torch.randn(2, 8)
    with caplog.at_level(logging.INFO, logger="quantizers.kernels"):
        assert kernels.select(x, 4) == "torch"
        assert kernels.select(x, 4) == "torch"
    lines = [r.getMessage() for r in caplog.records if r.name == "quantizers.kernels"]
    assert len(lines) == 1 and "torch kernels (CPU tensor)" in lines[0]


def test_mode_from_environment_and_errors(monkeypatch):
    kernels.set_kernel(None)
    monkeypatch.setenv("QDIABLO_KERNEL", "torch")
    assert kernels.kernel_mode() == "torch"
    monkeypatch.setenv("QDIABLO_KERNEL", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs CUDA, or TRITON_INTERPRET=1"):
        kernels.select(torch.randn(2, 8), 4)
    monkeypatch.setenv("QDIABLO_KERNEL", "fast")
    with pytest.raises(ValueError, match="expected one of auto, torch, triton"):
        kernels.kernel_mode()
    with pytest.raises(ValueError):
        kernels.set_kernel("cuda")


def test_interpreter_refuses_bf16_when_forced_and_auto_falls_back(interpret):
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="no bf16"):
        kernels.select(x, 4)
    kernels.set_kernel("auto")
    assert kernels.select(x, 4) == "torch"


def test_group_size_detection():
    assert kernels.group_size_of(torch.arange(160) // 64) == 64
    assert kernels.group_size_of(torch.zeros(160, dtype=torch.int32)) == 160
    assert kernels.group_size_of((torch.arange(160) // 32).flip(0)) is None


def test_import_without_triton():
    """quantizers and qdiablo import, and QuantLinear runs (torch path), with triton missing."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, quantizers, qdiablo\n"
        "from quantizers import kernels, QuantLinear\n"
        "assert kernels.triton_module() is None\n"
        "layer = QuantLinear(64, 32, 4, 32)\n"
        "print(layer(torch.randn(3, 64)).shape)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "torch.Size([3, 32])" in out.stdout


# --- GPU (a lent device) ----------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("m", [1, 5, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [-1, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gpu_matches_torch_path(compiled, bits, group_size, act_order, dtype, m):
    layer = make_layer(1024, 768, bits, group_size, act_order, bias=True, device="cuda")
    x = torch.randn(m, 1024, device="cuda").to(dtype)
    dy = torch.randn(m, 768, device="cuda").to(dtype)
    y_ref, dx_ref = torch_path(layer, x, dy)
    y, dx = kernel_path(layer, x, dy)
    assert_close(y, y_ref, dtype)
    assert_close(dx, dx_ref, dtype)


@cuda
@pytest.mark.parametrize("bits", [2, 4])
def test_gpu_never_materialises_the_weight(compiled, bits):
    """Forward and backward of a 4096×11008 layer allocate far less than its bf16 weight."""
    layer = make_layer(4096, 11008, bits, 128, act_order=False, device="cuda")
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    layer(x).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 4096 * 11008 * 2 / 8, f"{extra / 2**20:.1f} MiB allocated"


@cuda
def test_gpu_auto_picks_triton():
    kernels.set_kernel("auto")
    try:
        assert kernels.select(torch.randn(2, 8, device="cuda", dtype=torch.bfloat16), 4) == "triton"
    finally:
        kernels.set_kernel(None)
