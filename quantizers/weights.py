"""The tensor-level pipeline: one weight matrix (or a group of layers reading the same input)
through the registered steps and method (MagR → GPTQ or RTN → coordinate descent: see
quantizers/registry.py), packed into QuantLinear layers.

Layers that read the same input (q/k/v, gate/up) share one Hessian, so they are stacked row-wise
and solved together: MagR and GPTQ treat the rows of W independently given H, so this gives the
same result as one call per layer, with fewer, larger matrix operations.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from quantizers.config import QuantConfig
from quantizers.magr import fast_matmul_dtype
from quantizers.quant_linear import QuantLinear
from quantizers.registry import calibration_users, get_method, steps
from quantizers.report import LayerReport, QuantReport, median_max_abs, relative_output_error
from quantizers.rtn import QuantResult

log = logging.getLogger(__name__)


def quantize_weights(
    W: Tensor, H: Tensor | None, config: QuantConfig, name: str = "layer"
) -> tuple[QuantResult, Tensor | None]:
    """The tensor-level pipeline for one weight matrix [out, in]: the registered `pre` steps
    (MagR), the method (GPTQ, RTN, ...), the `post` steps (coordinate descent), as
    `config` turns them on (quantizers/registry.py). Returns the result and the weights the
    pre-steps made (or None when none ran)."""
    W = W.float()
    if H is None:
        users = calibration_users(config, ("pre", "post"))
        if users:
            verb = "needs" if len(users) == 1 else "need"
            raise ValueError(f"{name}: {' and '.join(users)} {verb} calibration data")
    target = W
    for step in steps(config, "pre"):
        target = step.run(target, H, config)
    result = get_method(config.method).quantize(target, H, config, name)
    for step in steps(config, "post"):
        result = step.run(W, result, H, config)
    return result, (None if target is W else target)


def _rows(result: QuantResult, a: int, b: int) -> QuantResult:
    return QuantResult(
        result.codes[a:b],
        result.scales[:, a:b],
        result.zeros[:, a:b],
        result.g_idx,
        result.bits,
        result.damp_percent,
    )


def quantize_group(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    names: Sequence[str],
    H: Tensor | None,
    config: QuantConfig,
    prefix: str,
    report: QuantReport,
) -> None:
    """Quantize layers that share one input (and Hessian) together, then swap them in. The
    method's `prepare` hook, when it has one, runs first (it may change the layers and the
    block in place, and returns the Hessian of the inputs the layers then see)."""
    prepare = get_method(config.method).prepare
    if prepare is not None:
        H = prepare(block, {n: linears[n] for n in names}, H, config)
    layers = [linears[n] for n in names]
    W = torch.cat([lin.weight.detach().float() for lin in layers])
    result, W_magr = quantize_weights(W, H, config, name=f"{prefix}.{'+'.join(names)}")
    Q = result.dequantize() if H is not None else None
    fast = fast_matmul_dtype(W.device)
    start = 0
    for name, lin in zip(names, layers):
        end = start + lin.out_features
        entry = LayerReport(f"{prefix}.{name}", (lin.out_features, lin.in_features))
        entry.damp_percent = result.damp_percent
        if H is not None:
            entry.rel_error = relative_output_error(W[start:end], Q[start:end], H, fast)
        if W_magr is not None:
            entry.max_abs_before = median_max_abs(W[start:end], config.group_size)
            entry.max_abs_after = median_max_abs(W_magr[start:end], config.group_size)
            entry.magr_change = relative_output_error(W[start:end], W_magr[start:end], H, fast)
        report.layers.append(entry)
        log.debug(
            "%s: rel. output error %s%s",
            entry.name,
            "n/a" if entry.rel_error is None else f"{entry.rel_error:.4f}",
            ""
            if W_magr is None
            else f"; MagR median max|w| {entry.max_abs_before:.4f} -> {entry.max_abs_after:.4f}"
            f" (output change {entry.magr_change:.4f})",
        )
        bias = lin.bias.detach() if lin.bias is not None else None
        packed = QuantLinear.from_result(_rows(result, start, end), config.group_size, bias)
        block.set_submodule(name, packed)
        start = end
