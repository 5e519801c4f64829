"""quantize_model: MagR, then GPTQ or RTN (then optional coordinate descent), block by block,
replacing each decoder block's nn.Linear layers with packed QuantLinear layers in place.

Layers that read the same input (q/k/v, gate/up) share one Hessian, so they are stacked row-wise
and solved together: MagR and GPTQ treat the rows of W independently given H, so this gives the
same result as one call per layer, with fewer, larger matrix operations.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from quantizers.calibration import (
    block_linears,
    capture_block_inputs,
    check_calibration_data,
    collect_hessians,
    find_decoder_blocks,
    input_groups,
    run_block,
)
from quantizers.cd import cd_refine
from quantizers.config import QuantConfig
from quantizers.e2e import teacher_topk, train_scales_end_to_end
from quantizers.gptq import gptq_quantize
from quantizers.magr import fast_matmul_dtype, magr
from quantizers.packing import packable
from quantizers.quant_linear import QuantLinear, dequantize_cache
from quantizers.reconstruct import recon_batches, reconstruct_block
from quantizers.report import (
    LayerReport,
    QuantReport,
    log_block,
    median_max_abs,
    relative_output_error,
)
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


def _quantize_group(
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


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _check_packable(blocks: nn.ModuleList, prefix: str, bits: int) -> None:
    for i, block in enumerate(blocks):
        for name, lin in block_linears(block, f"{prefix}.{i}").items():
            for n, what in ((lin.in_features, "in_features"), (lin.out_features, "out_features")):
                if not packable(n, bits):
                    raise ValueError(
                        f"{prefix}.{i}.{name}: {what}={n} cannot be packed at {bits} bits "
                        "(the GPTQ layout needs a multiple of 32 values per 32·bits-bit span)"
                    )


def needs_calibration(config: QuantConfig) -> bool:
    """Whether `config` cannot run without calibration data (RTN alone can)."""
    return config.method == "gptq" or config.magr or config.cd_sweeps > 0 or config.reconstruct


def _resolve_dtypes(
    device: torch.device, calib_dtype: Any, product_dtype: Any
) -> tuple[torch.dtype | None, torch.dtype | None]:
    """calib_dtype ('auto' → bf16 where the hardware multiplies it) and product_dtype ('calib' →
    calib_dtype's; None → float32) as dtypes, with a clear error otherwise."""
    if calib_dtype == "auto":
        calib_dtype = fast_matmul_dtype(device)
    elif calib_dtype is not None and not isinstance(calib_dtype, torch.dtype):
        raise ValueError(f"calib_dtype must be a torch.dtype, 'auto' or None, got {calib_dtype!r}")
    if product_dtype == "calib":
        product_dtype = calib_dtype
    elif product_dtype is not None and not isinstance(product_dtype, torch.dtype):
        raise ValueError(
            f"product_dtype must be a torch.dtype, 'calib' or None, got {product_dtype!r}"
        )
    return calib_dtype, product_dtype


@dataclass
class BlockInputs:
    """What the block-by-block loop carries from one decoder block to the next: the quantized
    model's inputs to the block, the keyword arguments each batch is called with, and (for
    reconstruction) the full-precision model's inputs; `heldout`: the last batches, held out by
    reconstruction to measure its error (neither GPTQ nor reconstruction fits them)."""

    hidden: list[Tensor] | None
    kwargs: list[dict] | None
    hidden_fp: list[Tensor] | None = None
    heldout: int = 0


def quantize_block(
    block: nn.Module,
    name: str,
    inputs: BlockInputs,
    config: QuantConfig,
    report: QuantReport,
    calib_dtype: torch.dtype | None,
    product_dtype: torch.dtype | None,
    device: torch.device,
) -> None:
    """Quantize one decoder block in place (MagR → GPTQ/RTN → pack, then reconstruction), and
    advance `inputs` to the next block's."""
    linears = block_linears(block, name)
    if inputs.hidden is None:  # RTN without data: every layer on its own, no report error
        for layer in linears:
            _quantize_group(block, linears, [layer], None, config, name, report)
        return
    hidden, kwargs = inputs.hidden, inputs.kwargs
    targets = None
    if inputs.hidden_fp is not None:  # the original block (before MagR) on X_fp
        with _autocast(device, calib_dtype):
            targets = run_block(copy.deepcopy(block), inputs.hidden_fp, kwargs)
    with _autocast(device, calib_dtype):
        groups = input_groups(block, linears, hidden[0], kwargs[0])
    stages = [[g] for g in groups] if config.true_sequential else [groups]
    fit = len(hidden) - inputs.heldout
    for stage in stages:
        # layers quantized so far dequantize once for all batches
        with dequantize_cache(block), _autocast(device, calib_dtype):
            hessians = collect_hessians(
                block, linears, stage, hidden[:fit], kwargs[:fit], product_dtype=product_dtype
            )
        for group in stage:
            _quantize_group(block, linears, group, hessians[group[0]], config, name, report)
    if targets is not None:
        rec = reconstruct_block(
            block, hidden, kwargs, targets, inputs.heldout, config, calib_dtype, name
        )
        report.reconstruction.append(rec)
        report.reconstruction_seconds += rec.seconds
        inputs.hidden_fp = targets
    with dequantize_cache(block), _autocast(device, calib_dtype):
        inputs.hidden = run_block(block, hidden, kwargs)


def quantize_model(
    model: nn.Module,
    calib_data: Sequence[Tensor] | None,
    config: QuantConfig,
    device: torch.device | str | None = None,
    calib_dtype: torch.dtype | str | None = None,
    product_dtype: torch.dtype | str | None = None,
    heldout_data: Sequence[Tensor] | None = None,
) -> nn.Module:
    """Quantize the linear layers of `model`'s decoder blocks in place and return the model.

    calib_data: a list of LongTensor (batch, seq_len); required for GPTQ, MagR and coordinate
        descent, optional for plain RTN (then only used for the error report).
    device: where each block is processed (one at a time); defaults to the model's device.
    calib_dtype: run the calibration forward passes under autocast to this dtype (e.g.
        torch.bfloat16: about 3x faster on a CPU with AVX512-BF16, as GPTQ is usually run in
        half precision on GPUs). The weights are still read and quantized in full precision.
        "auto" picks bfloat16 where the hardware multiplies it natively. Default: the model's
        own dtype.
    product_dtype: the dtype of each batch's XᵀX from the (possibly bf16-rounded) inputs; None:
        float32, the default. "calib": calib_dtype's, which was the default until 2026-12: products
        rounded to bfloat16 made H indefinite and GPTQ's Cholesky retry with more damping on
        1.4-6.2% of SmolLM2's layers, float32 on none (BENCHMARKS.md, the defaults table).
    With `config.reconstruct`, each block is then trained against the full-precision block
    (quantizers/reconstruct.py): the full-precision model's block inputs are carried alongside
    the quantized model's. heldout_data: windows (another source, or another slice of the same
    one) on which reconstruction measures its error and stops early; without them the last
    `recon_holdout` share of calib_data is held out. Neither GPTQ nor reconstruction fits
    held-out windows.
    Embeddings and lm_head are left alone. The per-layer report is `model.quantization_report`.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    start = time.perf_counter()
    prefix, blocks = find_decoder_blocks(model)
    if needs_calibration(config) or calib_data:
        check_calibration_data(calib_data)
    heldout = 0
    if config.reconstruct:  # mini-batches of training windows, then the held-out ones
        calib_data, heldout = recon_batches(calib_data, heldout_data, config)
    _check_packable(blocks, prefix, config.bits)
    model_device = next(model.parameters()).device
    device = torch.device(device) if device is not None else model_device
    calib_dtype, product_dtype = _resolve_dtypes(device, calib_dtype, product_dtype)
    report = QuantReport(config=config.to_dict())
    was_training = model.training
    model.eval()

    inputs = BlockInputs(None, None, heldout=heldout)
    teacher = None  # the end-to-end stage's targets: the full-precision model's, before any change
    e2e = config.reconstruct and config.recon_e2e_epochs > 0
    if e2e and config.recon_e2e_loss == "kl":
        teacher = teacher_topk(model, calib_data, config.recon_e2e_topk, calib_dtype)
    if calib_data:
        report.calibration_tokens = sum(b.numel() for b in calib_data)
        log.info(
            "calibrating on %d sequences, %d tokens",
            sum(b.shape[0] for b in calib_data),
            report.calibration_tokens,
        )
        with _autocast(device, calib_dtype):
            inputs.hidden, inputs.kwargs = capture_block_inputs(model, blocks, calib_data, device)
        held = inputs.hidden[len(inputs.hidden) - heldout :]
        report.heldout_windows = sum(h.shape[0] for h in held)
        if config.reconstruct:
            inputs.hidden_fp = list(inputs.hidden)  # the full-precision model's

    with logging_redirect_tqdm(), torch.no_grad():
        bar = tqdm(range(len(blocks)), desc=f"quantizing W{config.bits}", unit="block")
        for i in bar:
            block = blocks[i].to(device)
            first = len(report.layers)
            quantize_block(
                block, f"{prefix}.{i}", inputs, config, report, calib_dtype, product_dtype, device
            )
            log_block(f"{prefix}.{i}", report.layers[first:], bar)
            blocks[i] = block.to(model_device)
    if e2e:
        report.e2e = train_scales_end_to_end(
            model, calib_data, teacher, heldout, config.recon_e2e_epochs, config.recon_e2e_lr,
            config.recon_eval_every, config.recon_patience, config.recon_seed, calib_dtype,
        )  # fmt: skip

    report.seconds = time.perf_counter() - start
    model.quantization_report = report
    model.quant_config = config
    model.config.quantization_config = config.quantization_config()
    model.train(was_training)
    _log_summary(report, config)
    return model


def _log_summary(report: QuantReport, config: QuantConfig) -> None:
    retried = report.cholesky_fallbacks()
    if retried:
        log.warning(
            "GPTQ's Cholesky needed more damping than damp_percent=%g on %d of %d layers: %s",
            config.damp_percent,
            len(retried),
            len(report.layers),
            ", ".join(f"{r.name} ({r.damp_percent:g})" for r in retried),
        )
    mean = report.mean_rel_error()
    log.info(
        "quantized %d layers in %.1f s%s",
        len(report.layers),
        report.seconds,
        "" if mean is None else f"; mean rel. output error {mean:.4f}",
    )
