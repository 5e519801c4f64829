"""quantize_model: the registered method (GPTQ, RTN, ...) with its steps (MagR before,
coordinate descent after, reconstruction per block: quantizers/registry.py), block by block,
replacing each decoder block's nn.Linear layers with packed QuantLinear layers in place.

One decoder block is on the quantize device at a time; its weights may be read only when its
turn comes (`load_block`: the model's blocks stay on the meta device until then), each finished
block goes back to the host, and the calibration activations are updated in place, batch by
batch, on the device or on the host (`offload`). With a `BlockStore`, every finished block is
saved at once and a killed run resumes where it stopped (quantizers/resume.py). The memory this
takes is written out in docs/scale.md. The loop is in quantizers/block_loop.py, the
tensor-level steps in quantizers/weights.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from quantizers.block_loop import BlockInputs, BlockLoop, capture_inputs, quantize_block
from quantizers.calibration import (
    block_linears,
    check_calibration_data,
    find_decoder_blocks,
)
from quantizers.config import QuantConfig
from quantizers.e2e import teacher_topk, train_scales_end_to_end
from quantizers.magr import fast_matmul_dtype
from quantizers.packing import packable
from quantizers.recon_data import recon_batches
from quantizers.registry import needs_calibration
from quantizers.report import QuantReport
from quantizers.resume import BlockStore
from quantizers.weights import quantize_weights

__all__ = [
    "BlockInputs",
    "needs_calibration",
    "quantize_block",
    "quantize_model",
    "quantize_weights",
]

log = logging.getLogger(__name__)


def _check_packable(blocks: nn.ModuleList, prefix: str, bits: int) -> None:
    for i, block in enumerate(blocks):
        for name, lin in block_linears(block, f"{prefix}.{i}").items():
            for n, what in ((lin.in_features, "in_features"), (lin.out_features, "out_features")):
                if not packable(n, bits):
                    raise ValueError(
                        f"{prefix}.{i}.{name}: {what}={n} cannot be packed at {bits} bits "
                        "(the GPTQ layout needs a multiple of 32 values per 32·bits-bit span)"
                    )


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


def _host_device(model: nn.Module) -> torch.device:
    """Where the model's real (non-meta) weights are: finished blocks go back there."""
    for p in model.parameters():
        if not p.is_meta:
            return p.device
    return torch.device("cpu")


def quantize_model(
    model: nn.Module,
    calib_data: Sequence[Tensor] | None,
    config: QuantConfig,
    device: torch.device | str | None = None,
    calib_dtype: torch.dtype | str | None = None,
    product_dtype: torch.dtype | str | None = None,
    heldout_data: Sequence[Tensor] | None = None,
    *,
    load_block: Callable[[int, torch.device], nn.Module] | None = None,
    offload: bool = False,
    act_dtype: torch.dtype | str | None = None,
    store: BlockStore | None = None,
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
    load_block: (i, device) → decoder block i with its full-precision weights, for a model whose
        blocks are on the meta device (qdiablo reads them from the checkpoint's shards); only
        what runs before the first block (embeddings) needs real weights. Each finished block
        goes to where those are (the host), so one block at a time is full precision.
    offload: keep the calibration activations on the host, each batch moved to `device` when
        used (device memory: one block and its Hessians, not the activations).
    act_dtype: the dtype the activations are kept in ("calib": calib_dtype); None: as the
        blocks make them (the float32 residual stream of a float32 model).
    store: save each finished block there and resume from the blocks it already holds
        (quantizers/resume.py); a store of different settings is a ResumeMismatch.
    With `config.reconstruct`, each block is then trained against the full-precision block
    (quantizers/reconstruct.py): the full-precision model's block inputs are carried alongside
    the quantized model's. heldout_data: windows (another source, or another slice of the same
    one) on which reconstruction measures its error and stops early; without them the last
    `recon_holdout` share of calib_data is held out. Neither GPTQ nor reconstruction fits
    held-out windows. With `config.recon_e2e_epochs`, every layer's scales then train together
    against the full-precision model's next-token distributions (quantizers/e2e.py).
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
    model_device = _host_device(model)
    device = torch.device(device) if device is not None else model_device
    calib_dtype, product_dtype = _resolve_dtypes(device, calib_dtype, product_dtype)
    act_dtype = calib_dtype if act_dtype == "calib" else act_dtype
    report = QuantReport(config=config.to_dict())
    was_training = model.training
    model.eval()

    inputs = BlockInputs(None, None, heldout=heldout, dtype=act_dtype)
    keep = torch.device("cpu") if offload else device
    teacher = _e2e_teacher(model, config, calib_data, calib_dtype, device, load_block, keep)
    if calib_data:
        args = (report, config.reconstruct, device, keep, calib_dtype)
        capture_inputs(model, blocks, calib_data, inputs, *args)
    parts = (blocks, prefix, inputs, config, report, calib_dtype, product_dtype, device)
    BlockLoop(*parts, model_device, load_block, store).run(calib_data, act_dtype)
    if _e2e_on(config):  # the whole packed model on the device for this stage, then back
        model.to(device)
        report.e2e = train_scales_end_to_end(
            model, calib_data, teacher, heldout, config.recon_e2e_epochs, config.recon_e2e_lr,
            config.recon_eval_every, config.recon_patience, config.recon_seed, calib_dtype,
        )  # fmt: skip
        model.to(model_device)
    _finish(model, config, report, time.perf_counter() - start, was_training)
    return model


def _e2e_on(config: QuantConfig) -> bool:
    """Whether reconstruction's end-to-end stage runs after the blocks (quantizers/e2e.py)."""
    return config.reconstruct and config.recon_e2e_epochs > 0


def _e2e_teacher(model, config, calib_data, calib_dtype, device, load_block, keep):
    """The end-to-end stage's targets: the full-precision model's top-k next tokens, taken
    before any block changes; None when the stage is off or fits the text's own loss."""
    if not _e2e_on(config) or config.recon_e2e_loss != "kl":
        return None
    k = config.recon_e2e_topk
    return teacher_topk(model, calib_data, k, calib_dtype, device, load_block, keep)


def _finish(
    model: nn.Module, config: QuantConfig, report: QuantReport, seconds: float, training: bool
) -> None:
    """Record the run on the model (report, settings, the config.json entry) and log it."""
    report.seconds = seconds
    model.quantization_report = report
    model.quant_config = config
    model.config.quantization_config = config.quantization_config()
    model.train(training)
    _log_summary(report, config)


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
