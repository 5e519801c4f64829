"""Which kernel runs QuantLinear's packed matmuls: the torch path or a registered backend (the
fused Triton kernels are the one built in; quantizers/kernels/backends.py declares them all).

    QDIABLO_KERNEL=auto    (default) the first registered backend that supports the input (bits,
                           dtype, device), can run here and takes its number of rows: Triton for
                           CUDA tensors of at most AUTO_TRITON_MAX_M rows (decode, small batches)
                           when triton imports; the torch path otherwise (training-size M, CPU,
                           no triton)
    QDIABLO_KERNEL=torch   always the torch path (dequantize, then matmul)
    QDIABLO_KERNEL=triton  always Triton (any registered backend's name: always that one); an
                           error where it cannot run. With TRITON_INTERPRET=1 this runs the
                           kernels on CPU tensors through Triton's interpreter (slow: for tests)

`set_kernel("triton")` overrides the environment from Python. The choice is made once per
(mode, device, dtype, bits, M's side of each backend's `max_rows`) and cached: a training step
calls `select` two or three times per packed layer, and the device capability and the triton
version are read only when a new combination first comes (`set_kernel` and registering a backend
clear the cache). It is logged then, at INFO on the `quantizers.kernels` logger. The first time
each compiled variant runs on a GPU it is checked against the torch path (`selfcheck`); a
variant that fails is not used again. Nothing here imports triton until a Triton kernel is
actually wanted, so importing `quantizers` never needs it.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

import torch
from torch import Tensor

from quantizers.kernels import selfcheck
from quantizers.kernels.backends import (
    TORCH,
    KernelBackend,
    all_backends,
    get_backend,
    modes,
    on_change,
    register_backend,
)

log = logging.getLogger(__name__)

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
_thresholds: tuple[int, ...] = ()  # every backend's max_rows: the sides of M that select keys on
_module: ModuleType | None = None
_import_error: str | None = None


def _backends_changed() -> None:
    global _thresholds
    _thresholds = tuple(sorted({b.max_rows for b in all_backends() if b.max_rows is not None}))
    _selected.clear()


on_change(_backends_changed)


def set_kernel(mode: str | None) -> None:
    """Force "auto", "torch" or a backend ("triton") from Python; None: $QDIABLO_KERNEL again."""
    if mode is not None and mode not in modes():
        raise ValueError(f"kernel mode {mode!r}: expected one of {', '.join(modes())}")
    global _override
    _override = mode
    _selected.clear()


def kernel_mode() -> str:
    """The requested mode: `set_kernel`'s, else $QDIABLO_KERNEL, else "auto"."""
    mode = _override or os.environ.get("QDIABLO_KERNEL", "auto").strip().lower() or "auto"
    if mode not in modes():
        raise ValueError(f"QDIABLO_KERNEL={mode!r}: expected one of {', '.join(modes())}")
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


def _validate_triton(x: Tensor, bits: int) -> str | None:
    """None when the Triton kernels can run on x, else the reason they cannot (beyond the
    declared bits and dtypes). Imports triton only once a CUDA tensor (or the interpreter)
    asks for it."""
    del bits
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
    """The backend ("torch", or a registered one's name) for a packed matmul on x: decided (and
    logged) once per combination of mode, device, dtype, bits and M's side of each backend's
    `max_rows`, then cached. Reads nothing from the device (x's shape and device are host
    metadata)."""
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 1
    key = (
        _override,
        os.environ.get("QDIABLO_KERNEL"),
        os.environ.get("TRITON_INTERPRET"),
        x.device,
        x.dtype,
        bits,
        tuple(rows > t for t in _thresholds),
    )
    choice = _selected.get(key)
    if choice is None:
        choice = _select(x, bits, rows)  # raises where a forced mode cannot run: not cached
        _selected[key] = choice
    return choice


def _select(x: Tensor, bits: int, rows: int) -> str:
    """`select`'s decision, from scratch, logged once per (device, dtype, bits, backend)."""
    mode = kernel_mode()
    if mode == TORCH:
        choice, why = TORCH, "QDIABLO_KERNEL=torch"
    elif mode != "auto":
        reason = get_backend(mode).why_not(x, bits)
        if reason is not None:
            raise RuntimeError(
                f"QDIABLO_KERNEL={mode}, but the {mode} kernels cannot run: {reason}"
            )
        choice, why = mode, f"QDIABLO_KERNEL={mode}"
    else:
        choice, why = _auto(x, bits, rows)
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


def _auto(x: Tensor, bits: int, rows: int) -> tuple[str, str]:
    """The `auto` rule: the first registered backend that can run on x and takes `rows` rows;
    else the torch path, with the first backend's reason."""
    reasons = []
    for backend in all_backends():
        reason = backend.why_not(x, bits)
        if reason is None and backend.max_rows is not None and rows > backend.max_rows:
            reason = (
                f"M={rows} > {backend.max_rows} rows: dequantize + cuBLAS ({backend.name} max_rows)"
            )
        if reason is None:
            return backend.name, "QDIABLO_KERNEL=auto"
        reasons.append(reason)
    if x.device.type == "cpu" and all(r.startswith("tensor on") for r in reasons):
        return TORCH, "CPU tensor"
    return TORCH, reasons[0] if reasons else "no kernel backend registered"


def backend_forward(
    name: str, x, qweight, qzeros, scales, g_idx, bits, bias, group
) -> Tensor | None:
    """Y = X · W (+ bias) by backend `name` for X [M, K], or None when the first-use self-check
    rejected this variant (the caller then takes the torch path)."""
    backend = get_backend(name)
    if not selfcheck.passed(backend, "fwd", x, bits, group, bias is not None, kernel_mode()):
        return None
    return backend.forward(x, qweight, qzeros, scales, g_idx, bits, bias, group)


def backend_backward_input(
    name: str, dy, qweight, qzeros, scales, g_idx, bits, group
) -> Tensor | None:
    """dX = dY · Wᵀ by backend `name` for dY [M, N], or None (the torch path: the backend has
    no dX kernel, or see `backend_forward`)."""
    backend = get_backend(name)
    if backend.backward_input is None:
        return None
    if not selfcheck.passed(backend, "dx", dy, bits, group, False, kernel_mode(), g_idx.shape[0]):
        return None
    return backend.backward_input(dy, qweight, qzeros, scales, g_idx, bits, group)


# The built-in backend: the fused Triton kernels of triton_qmm (imported on first use).


def _triton_forward(x, qweight, qzeros, scales, g_idx, bits, bias, group) -> Tensor:
    return triton_module().forward(x, qweight, qzeros, scales, g_idx, bits, bias, group)


def _triton_backward_input(dy, qweight, qzeros, scales, g_idx, bits, group) -> Tensor:
    return triton_module().backward_input(dy, qweight, qzeros, scales, g_idx, bits, group)


def _triton_variant(kind: str, m: int, k: int, dtype, bits: int, group) -> tuple:
    return triton_module().variant(kind, m, k, dtype, bits, group)


def _triton_describe(v: tuple) -> str:
    return (
        f"{v[0]} kernel, tile {'x'.join(map(str, v[1:4]))} warps {v[4]} stages {v[5]}, "
        f"ALIGNED={v[6]}"
    )


def _triton_launches(m: int, bits: int, dtype, aligned: bool, bias: bool) -> list:
    from quantizers.kernels.aot import launches  # needs triton's compiler: only for the matrix

    return launches(m, bits, dtype, aligned, bias)


TRITON = register_backend(
    KernelBackend(
        name="triton",
        forward=_triton_forward,
        backward_input=_triton_backward_input,
        bits=SUPPORTED_BITS,
        devices=("cuda", "cpu"),  # cpu: only under Triton's interpreter (`_validate_triton`)
        dtypes=SUPPORTED_DTYPES,
        available=lambda: triton_module() is not None,
        validate=_validate_triton,
        max_rows=AUTO_TRITON_MAX_M,
        variant=_triton_variant,
        describe=_triton_describe,
        aot_launches=_triton_launches,
    )
)


def group_size_of(g_idx: Tensor) -> int | None:
    """The group size g when g_idx == arange(K) // g (no act-order; K for a single group), else
    None. It syncs with the device: callers cache it (QuantLinear does, per g_idx version)."""
    k = g_idx.numel()
    g = int((g_idx == 0).sum())
    if g == 0 or not torch.equal(g_idx.long(), torch.arange(k, device=g_idx.device) // g):
        return None
    return min(g, k)
