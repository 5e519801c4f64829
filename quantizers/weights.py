"""The tensor-level pipeline: one weight matrix (or a group of layers reading the same input)
through MagR → GPTQ or RTN → coordinate descent, packed into QuantLinear layers.

Layers that read the same input (q/k/v, gate/up) share one Hessian, so they are stacked row-wise
and solved together: MagR and GPTQ treat the rows of W independently given H, so this gives the
same result as one call per layer, with fewer, larger matrix operations.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from quantizers.cd import cd_refine
from quantizers.config import QuantConfig
from quantizers.gptq import gptq_quantize
from quantizers.magr import fast_matmul_dtype, magr
from quantizers.quant_linear import QuantLinear
from quantizers.report import LayerReport, QuantReport, median_max_abs, relative_output_error
from quantizers.rtn import QuantResult, rtn_quantize

log = logging.getLogger(__name__)


def quantize_weights(
    W: Tensor, H: Tensor | None, config: QuantConfig, name: str = "layer"
) -> tuple[QuantResult, Tensor | None]:
    """The tensor-level pipeline for one weight matrix [out, in]: MagR (optional) → GPTQ or RTN
    → coordinate descent (optional). Returns the result and the MagR'd weights (or None)."""
    W = W.float()
    if H is None and (config.method == "gptq" or config.magr or config.cd_sweeps):
        raise ValueError(f"{name}: method {config.method!r} with MagR/CD needs calibration data")
    W_magr = None
    target = W
    if config.magr:
        W_magr = magr(
            W,
            H,
            alpha=config.resolved_magr_alpha,
            iters=config.magr_iters,
            group_size=config.group_size,
            accelerate=config.magr_solver == "fista",
            matmul_dtype=fast_matmul_dtype(W.device),
        )
        target = W_magr
    beta = config.resolved_beta
    if config.method == "gptq":
        result = gptq_quantize(
            target,
            H,
            config.bits,
            group_size=config.group_size,
            sym=config.sym,
            beta=beta,
            damp_percent=config.damp_percent,
            desc_act=config.desc_act,
            static_groups=config.static_groups,
            min_zero=config.min_zero,
            name=name,
        )
    else:
        result = rtn_quantize(
            target, config.bits, config.group_size, config.sym, beta, config.min_zero
        )
    if config.cd_sweeps:
        result = cd_refine(W, result, H, config.cd_sweeps, config.cd_damp)
    return result, W_magr


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
    """Quantize layers that share one input (and Hessian) together, then swap them in."""
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
