"""First-use self-check of every kernel backend (quantizers/kernels/backends.py; the Triton
kernels are the built-in one): trust no compiled variant before it has matched the torch path
once on this device.

The first time a variant (the backend's `variant`: for Triton the kernel, tile and ALIGNED;
then HAS_BIAS, bits, dtype, device) is about to run,
it runs once on a random case with ragged N and K (and the same M, so the same tile), and its
result is compared with the torch path's (float32 dequantize + matmul). A mismatch beyond
TOLERANCE, or a compile or launch error, logs one warning naming the variant and sends that
variant to the torch path from then on; when that backend is forced (QDIABLO_KERNEL=triton) it
raises instead. The check
never runs during CUDA-graph capture or torch.compile tracing (the variant then runs unchecked,
and is checked at its next eager call). It runs on CUDA; tests turn it on for the interpreter
with `ON_CPU`.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from quantizers.packing import dequantize_packed

log = logging.getLogger("quantizers.kernels")

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
"""Largest accepted max|kernel − reference| / max(max|reference|, 1). The reference is exact
(float32 products of small integers and fp16 scales, summed in float64); the kernels round the
weight to the activation dtype (fp16: 11 bits, bf16: 8) and accumulate in float32, so a correct
kernel errs by a few units of that rounding; an unpacking slip errs by a whole code step."""

CHECK_N, CHECK_K, CHECK_GROUP = 160, 288, 128
"""The check's shape: multiples of 32 (packable at every bit width) that leave ragged edges in
the 64- and 128-wide tiles, with 3 groups of 128 rows (the last one partial)."""

ON_CPU = False
"""Also check under Triton's interpreter (CPU tensors): for tests of this mechanism."""

_verdicts: dict[tuple, bool] = {}


def _busy() -> bool:
    """Whether a check must not run now: CUDA-graph capture or torch.compile tracing."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def passed(
    backend, kind: str, a: Tensor, bits: int, group, has_bias: bool, mode: str, k=None
) -> bool:
    """Whether the variant of `backend` (a KernelBackend) that `kind` ("fwd" or "dx") runs for
    input `a` [M, K or N] may run: checked once per variant and device. False: use the torch
    path (raises when `mode` forces this backend)."""
    if a.device.type != "cuda" and not ON_CPU:
        return True
    m = a.shape[0]
    k = a.shape[1] if k is None else k
    variant = backend.variant(kind, m, k, a.dtype, bits, group)
    bias = has_bias if kind == "fwd" else False
    key = (backend.name, *variant, bias, bits, a.dtype, str(a.device))
    verdict = _verdicts.get(key)
    if verdict is not None:
        return verdict
    if _busy():
        return True
    name = (
        f"{backend.name} {backend.describe(variant)}, HAS_BIAS={bias}, {bits}-bit, "
        f"{str(a.dtype).removeprefix('torch.')}, {a.device}"
    )
    try:
        error = _run(backend, kind, m, a.dtype, a.device, bits, aligned=variant[-1], bias=bias)
        problem = None if error <= TOLERANCE[a.dtype] else f"relative error {error:.3g}"
    except Exception as e:
        problem = f"{type(e).__name__}: {e}"
    if problem is not None:
        if problem.startswith("relative"):
            problem += f" > tolerance {TOLERANCE[a.dtype]:g}"
        if mode == backend.name:
            raise RuntimeError(
                f"QDIABLO_KERNEL={mode}: the {name} failed its self-check"
                f" against the torch path: {problem}"
            )
        log.warning(
            "%s failed its first-use self-check against the torch path (%s): using the "
            "torch path for it from now on",
            name,
            problem,
        )
    _verdicts[key] = problem is None
    return problem is None


def _run(backend, kind, m, dtype, device, bits, aligned: bool, bias: bool) -> float:
    """The kernel's relative error on a random packed layer with ragged N and K."""

    g = torch.Generator().manual_seed(1234)
    n, k = CHECK_N, CHECK_K
    groups = -(-k // CHECK_GROUP)
    words = torch.randint(-(2**31), 2**31 - 1, (k * bits // 32, n), generator=g, dtype=torch.int32)
    zeros = torch.randint(
        -(2**31), 2**31 - 1, (groups, n * bits // 32), generator=g, dtype=torch.int32
    )
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.005).half()
    g_idx = (torch.arange(k) // CHECK_GROUP).int()
    group = CHECK_GROUP
    if not aligned:  # act-order: a permuted group map
        g_idx, group = g_idx[torch.randperm(k, generator=g)], None
    packed = [t.to(device) for t in (words, zeros, scales, g_idx)]
    w = dequantize_packed(*packed, bits).double()
    if kind == "fwd":
        x = torch.randn(m, k, generator=g).to(device, dtype)
        b = torch.randn(n, generator=g).to(device, dtype) if bias else None
        got = backend.forward(x, *packed, bits, b, group)
        want = x.double() @ w + (b.double() if bias else 0)
    else:
        dy = torch.randn(m, n, generator=g).to(device, dtype)
        got = backend.backward_input(dy, *packed, bits, group)
        want = dy.double() @ w.t()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1.0))
