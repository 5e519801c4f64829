"""Which kernel runs QuantLinear's packed matmuls: the torch path or the fused Triton kernels.

    QDIABLO_KERNEL=auto    (default) Triton for CUDA tensors of at most AUTO_TRITON_MAX_M rows
                           (decode, small batches) when triton imports and the bits/dtype are
                           supported; the torch path otherwise (training-size M, CPU, no triton)
    QDIABLO_KERNEL=torch   always the torch path (dequantize, then matmul)
    QDIABLO_KERNEL=triton  always Triton; an error where it cannot run. With TRITON_INTERPRET=1
                           this runs the kernels on CPU tensors through Triton's interpreter
                           (slow: for tests)

`set_kernel("triton")` overrides the environment from Python. The choice is made once per
(mode, device, dtype, bits, M above or below AUTO_TRITON_MAX_M) and cached: a training step calls
`select` two or three times per packed layer, and the device capability and the triton version
are read only when a new combination first comes (`set_kernel` clears the cache). It is logged
then, at INFO on the `quantizers.kernels` logger. The first time each
compiled variant runs on a GPU it is checked against the torch path (`selfcheck`); a variant that
fails is not used again. Nothing here imports triton until a Triton kernel is actually wanted, so
importing `quantizers` never needs it.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

import torch
from torch import Tensor

from quantizers.kernels import selfcheck

log = logging.getLogger(__name__)

MODES = ("auto", "torch", "triton")
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

AUTO_TRITON_MAX_M = 16
"""`auto` runs the fused Triton kernels for at most this many rows (tokens) and the torch path
(dequantize, then cuBLAS) above. The evidence, until a measured GPU table in BENCHMARKS.md
(benchmarks/gpu_suite.py, section `kernels`) says the fused kernels win at training-size M:
- at decode (M <= 16) a matmul is bound by reading the weight: the fused GEMV reads the packed
  bits once, the torch path reads them, writes a full-precision weight and reads it again
  (about 5x the bytes at 4 bits, 2 bytes a weight out and in again against 0.5 in);
- at training-size M the matmul is compute bound, and cuBLAS's tensor-core GEMM is what fused
  dequantize kernels have to beat: GPTQModel routes training through its torch path (dequantize
  + cuBLAS), not its Triton kernels; unsloth's authors report cuBLAS beating fused dequantize
  kernels at training-size M; torchao's fused int4 kernel was on par with compiled torch on
  H100. The dequantized weight is transient (one layer at a time), so the torch path costs one
  layer's weight of memory, not the model's;
- no qdiablo kernel has yet been timed on a GPU (they are compile-checked for sm_80..sm_120:
  tests/test_kernels_aot.py), so `auto` does not bet a first training run on them."""

MIN_TRITON = (3, 9)
"""The oldest triton the kernels are compile-checked with (tests/test_kernels_aot.py, pinned in
pyproject's dev extra): `auto` uses the torch path below it; QDIABLO_KERNEL=triton still runs
(the first-use self-check then guards each variant)."""

_override: str | None = None
_logged: set[tuple] = set()
_selected: dict[tuple, str] = {}
_module: ModuleType | None = None
_import_error: str | None = None


def set_kernel(mode: str | None) -> None:
    """Force "auto", "torch" or "triton" from Python; None goes back to $QDIABLO_KERNEL."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"kernel mode {mode!r}: expected one of {', '.join(MODES)}")
    global _override
    _override = mode
    _selected.clear()


def kernel_mode() -> str:
    """The requested mode: `set_kernel`'s, else $QDIABLO_KERNEL, else "auto"."""
    mode = _override or os.environ.get("QDIABLO_KERNEL", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"QDIABLO_KERNEL={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_module() -> ModuleType | None:
    """The kernel module (`triton_qmm`), imported on first use; None if triton is missing or
    broken. Triton reads TRITON_INTERPRET when it is imported (its own library functions, such
    as tl.zeros, are decorated then): set it before anything imports triton."""
    global _module, _import_error
    if _module is None and _import_error is None:
        try:
            _module = importlib.import_module("quantizers.kernels.triton_qmm")
        except Exception as e:  # ImportError, or a triton that fails to initialise
            _import_error = f"{type(e).__name__}: {e}"
    return _module


def _why_not_triton(x: Tensor, bits: int) -> str | None:
    """None when the Triton kernels can run on x, else the reason they cannot."""
    if bits not in SUPPORTED_BITS:
        return f"{bits}-bit is not supported by the Triton kernels"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} is not supported by the Triton kernels"
    if x.device.type != "cuda" and not interpreting():
        return f"tensor on {x.device.type} (Triton needs CUDA, or TRITON_INTERPRET=1)"
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] < 7:
        return "GPU older than compute capability 7.0"
    if interpreting() and x.dtype == torch.bfloat16:
        return "Triton's interpreter has no bf16"
    module = triton_module()
    if module is None:
        return f"triton unavailable ({_import_error})"
    if interpreting() != module.INTERPRETED:
        return "TRITON_INTERPRET changed after triton was imported"
    version = triton_version()
    if version < MIN_TRITON and kernel_mode() == "auto":
        return (
            f"triton {'.'.join(map(str, version))} is older than "
            f"{'.'.join(map(str, MIN_TRITON))}, the oldest the kernels are compile-checked with"
        )
    return None


def triton_version() -> tuple[int, ...]:
    """The imported triton's (major, minor)."""
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())


def select(x: Tensor, bits: int) -> str:
    """The backend, "triton" or "torch", for a packed matmul on x: decided (and logged) once per
    combination of mode, device, dtype, bits and M's side of AUTO_TRITON_MAX_M, then cached.
    Reads nothing from the device (x's shape and device are host metadata)."""
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 1
    key = (
        _override,
        os.environ.get("QDIABLO_KERNEL"),
        os.environ.get("TRITON_INTERPRET"),
        x.device,
        x.dtype,
        bits,
        rows > AUTO_TRITON_MAX_M,
    )
    choice = _selected.get(key)
    if choice is None:
        choice = _select(x, bits, rows)  # raises where a forced mode cannot run: not cached
        _selected[key] = choice
    return choice


def _select(x: Tensor, bits: int, rows: int) -> str:
    """`select`'s decision, from scratch, logged once per (device, dtype, bits, backend)."""
    mode = kernel_mode()
    if mode == "torch":
        choice, why = "torch", "QDIABLO_KERNEL=torch"
    else:
        reason = _why_not_triton(x, bits)
        if reason is None and mode == "auto" and rows > AUTO_TRITON_MAX_M:
            reason = f"M={rows} > {AUTO_TRITON_MAX_M} rows: dequantize + cuBLAS (AUTO_TRITON_MAX_M)"
        if reason is None:
            choice, why = "triton", f"QDIABLO_KERNEL={mode}"
        elif mode == "triton":
            raise RuntimeError(
                f"QDIABLO_KERNEL=triton, but the Triton kernels cannot run: {reason}"
            )
        elif x.device.type == "cpu" and reason.startswith("tensor on"):
            choice, why = "torch", "CPU tensor"
        else:
            choice, why = "torch", reason
    key = (x.device.type, x.dtype, bits, choice, why.startswith("M="))  # one line per M rule
    if key not in _logged:
        _logged.add(key)
        log.info(
            "QuantLinear %d-bit, %s on %s: %s kernels (%s)",
            bits,
            str(x.dtype).removeprefix("torch."),
            x.device.type,
            choice,
            why,
        )
    return choice


def triton_forward(x, qweight, qzeros, scales, g_idx, bits, bias, group) -> Tensor | None:
    """Y = X · W (+ bias) by the Triton kernels for X [M, K], or None when the first-use
    self-check rejected this variant (the caller then takes the torch path)."""
    qmm = triton_module()
    if not selfcheck.passed(qmm, "fwd", x, bits, group, bias is not None, kernel_mode()):
        return None
    return qmm.forward(x, qweight, qzeros, scales, g_idx, bits, bias, group)


def triton_backward_input(dy, qweight, qzeros, scales, g_idx, bits, group) -> Tensor | None:
    """dX = dY · Wᵀ by the Triton kernels for dY [M, N], or None (see `triton_forward`)."""
    qmm = triton_module()
    if not selfcheck.passed(qmm, "dx", dy, bits, group, False, kernel_mode(), g_idx.shape[0]):
        return None
    return qmm.backward_input(dy, qweight, qzeros, scales, g_idx, bits, group)


def group_size_of(g_idx: Tensor) -> int | None:
    """The group size g when g_idx == arange(K) // g (no act-order; K for a single group), else
    None. It syncs with the device: callers cache it (QuantLinear does, per g_idx version)."""
    k = g_idx.numel()
    g = int((g_idx == 0).sum())
    if g == 0 or not torch.equal(g_idx.long(), torch.arange(k, device=g_idx.device) // g):
        return None
    return min(g, k)
