"""Kernel backends declare themselves here: what they support, whether they can run, and their
entry points. `quantizers.kernels.select` (the `auto` rule and the forced modes), the first-use
self-check (`selfcheck.py`) and the compile matrix (`aot.py`) iterate over what is registered;
the torch path (dequantize, then matmul) is the reference every backend falls back to.

A new kernel is one module that calls `register_backend(KernelBackend(...))`:
tests/test_kernel_backends.py registers a toy one from the test file alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

ALL_BITS = (2, 3, 4, 8)


def _always() -> bool:
    return True


def _no_rule(x: Tensor, bits: int) -> str | None:
    del x, bits
    return None


def _plain_variant(kind: str, m: int, k: int, dtype, bits: int, group: int | None) -> tuple:
    del m, k, dtype, bits
    return (kind, group is not None)


@dataclass(frozen=True)
class KernelBackend:
    """One way to run QuantLinear's packed matmuls.

    `forward(x [M, K], qweight, qzeros, scales, g_idx, bits, bias, group) -> y [M, N]` and
    `backward_input(dy [M, N], qweight, qzeros, scales, g_idx, bits, group) -> dx [M, K]` (None:
    dX takes the torch path); `group` is the contiguous group size, or None under act-order.
    `available()`: whether it can run on this machine at all (its library imports, ...).
    `validate(x, bits)`: None when it can run on x at `bits`, else the reason, for what the
    declared bits, devices and dtypes do not say (a GPU's compute capability, a library
    version); it reads only host metadata (no device sync: it runs once per new combination).
    `max_rows`: `auto` picks it for inputs of at most this many rows (tokens), None for any.
    `variant(kind, m, k, dtype, bits, group)`: what decides which compiled code a launch runs,
    keying the first-use self-check; its last element says whether the group layout is
    contiguous (the check then builds the same layout). `describe(variant)` names it in logs.
    `aot_launches(m, bits, dtype, aligned, bias)`: a Triton backend's launches on meta tensors,
    for the compile matrix (quantizers/kernels/aot.py); None for a backend that compiles
    nothing ahead."""

    name: str
    forward: Callable[..., Tensor]
    backward_input: Callable[..., Tensor] | None = None
    bits: tuple[int, ...] = ALL_BITS
    devices: tuple[str, ...] = ("cuda",)
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
    available: Callable[[], bool] = _always
    validate: Callable[[Tensor, int], str | None] = _no_rule
    max_rows: int | None = None
    variant: Callable[..., tuple] = _plain_variant
    describe: Callable[[tuple], str] = field(default=lambda v: " ".join(map(str, v)))
    aot_launches: Callable[..., list] | None = None

    def why_not(self, x: Tensor, bits: int) -> str | None:
        """None when this backend can run a packed matmul on x, else the reason: the declared
        bits, dtypes and devices, then `validate`, then `available()` (so that a backend that
        imports its library to answer is asked only about inputs it could take)."""
        if bits not in self.bits:
            return f"{bits}-bit is not supported by the {self.name} kernels"
        if x.dtype not in self.dtypes:
            return f"dtype {x.dtype} is not supported by the {self.name} kernels"
        if x.device.type not in self.devices:
            runs_on = ", ".join(self.devices)
            return f"tensor on {x.device.type} (the {self.name} kernels run on {runs_on})"
        reason = self.validate(x, bits)
        if reason is None and not self.available():
            return f"{self.name} unavailable"
        return reason


TORCH = "torch"
"""The reference path (dequantize, then matmul), always there: not a registered backend."""

_backends: dict[str, KernelBackend] = {}
_listeners: list[Callable[[], None]] = []


def register_backend(backend: KernelBackend, *, replace: bool = False) -> KernelBackend:
    """Add a backend; `auto` tries the registered ones in registration order."""
    if backend.name in ("auto", TORCH):
        raise ValueError(f"kernel backend name {backend.name!r} is reserved")
    if backend.name in _backends and not replace:
        raise ValueError(f"kernel backend {backend.name!r} is already registered")
    _backends[backend.name] = backend
    _changed()
    return backend


def unregister_backend(name: str) -> None:
    """Remove a backend (tests that register one clean up with this)."""
    _backends.pop(name, None)
    _changed()


def on_change(listener: Callable[[], None]) -> None:
    """Call `listener` whenever the registered backends change (the selection cache clears)."""
    _listeners.append(listener)


def _changed() -> None:
    for listener in _listeners:
        listener()


def all_backends() -> list[KernelBackend]:
    """The registered backends, in the order `auto` tries them."""
    return list(_backends.values())


def get_backend(name: str) -> KernelBackend:
    return _backends[name]


def modes() -> tuple[str, ...]:
    """QDIABLO_KERNEL's values: auto, torch, and every registered backend."""
    return ("auto", TORCH, *_backends)
