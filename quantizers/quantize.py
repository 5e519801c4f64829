"""quantize_model: MagR, then GPTQ or RTN (then optional coordinate descent), block by block,
replacing each decoder block's nn.Linear layers with packed QuantLinear layers in place.

One decoder block is on the quantize device at a time; its weights may be read only when its
turn comes (`load_block`: the model's blocks stay on the meta device until then), each finished
block goes back to the host, and the calibration activations are updated in place, batch by
batch, on the device or on the host (`offload`). With a `BlockStore`, every finished block is
saved at once and a killed run resumes where it stopped (quantizers/resume.py). The memory this
takes is written out in docs/scale.md. The tensor-level steps are in quantizers/weights.py.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
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
    run_block_,
)
from quantizers.config import QuantConfig
from quantizers.e2e import teacher_topk, train_scales_end_to_end
from quantizers.fileio import release_host_memory
from quantizers.magr import fast_matmul_dtype
from quantizers.packing import packable
from quantizers.quant_linear import dequantize_cache
from quantizers.reconstruct import recon_batches, reconstruct_block
from quantizers.report import QuantReport, log_block
from quantizers.resume import BlockStore, tensor_digest
from quantizers.weights import quantize_group, quantize_weights

__all__ = [
    "BlockInputs",
    "needs_calibration",
    "quantize_block",
    "quantize_model",
    "quantize_weights",
]

log = logging.getLogger(__name__)


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
    reconstruction to measure its error (neither GPTQ nor reconstruction fits them). The
    batches live on the quantize device, or on the host when offloaded, in `dtype` (None: as
    the blocks make them)."""

    hidden: list[Tensor] | None
    kwargs: list[dict] | None
    hidden_fp: list[Tensor] | None = None
    heldout: int = 0
    dtype: torch.dtype | None = None


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
    """Quantize one decoder block (on `device`) in place (MagR → GPTQ/RTN → pack, then
    reconstruction), and advance `inputs` to the next block's, batch by batch in place."""
    linears = block_linears(block, name)
    if inputs.hidden is None:  # RTN without data: every layer on its own, no report error
        for layer in linears:
            quantize_group(block, linears, [layer], None, config, name, report)
        return
    hidden, kwargs = inputs.hidden, inputs.kwargs
    if inputs.hidden_fp is not None:  # X_fp becomes F(X_fp): the original block (before MagR)
        with _autocast(device, calib_dtype):
            run_block_(block, inputs.hidden_fp, kwargs, device, inputs.dtype)
    with _autocast(device, calib_dtype):
        groups = input_groups(block, linears, hidden[0], kwargs[0], device)
    stages = [[g] for g in groups] if config.true_sequential else [groups]
    fit = len(hidden) - inputs.heldout
    for stage in stages:
        # layers quantized so far dequantize once for all batches
        with dequantize_cache(block), _autocast(device, calib_dtype):
            hessians = collect_hessians(
                block,
                linears,
                stage,
                hidden[:fit],
                kwargs[:fit],
                product_dtype=product_dtype,
                device=device,
            )
        for group in stage:
            quantize_group(block, linears, group, hessians[group[0]], config, name, report)
        del hessians
    if inputs.hidden_fp is not None:
        rec = reconstruct_block(
            block, hidden, kwargs, inputs.hidden_fp, inputs.heldout, config, calib_dtype, name
        )
        report.reconstruction.append(rec)
        report.reconstruction_seconds += rec.seconds
    with dequantize_cache(block), _autocast(device, calib_dtype):
        run_block_(block, hidden, kwargs, device, inputs.dtype)


def _capture(
    model: nn.Module,
    blocks: nn.ModuleList,
    calib_data: Sequence[Tensor],
    inputs: BlockInputs,
    report: QuantReport,
    reconstruct: bool,
    device: torch.device,
    keep: torch.device,
    calib_dtype: torch.dtype | None,
) -> None:
    """The first block's inputs for every calibration batch, kept on `keep`."""
    report.calibration_tokens = sum(b.numel() for b in calib_data)
    log.info(
        "calibrating on %d sequences, %d tokens",
        sum(b.shape[0] for b in calib_data),
        report.calibration_tokens,
    )
    with _autocast(device, calib_dtype):
        inputs.hidden, inputs.kwargs = capture_block_inputs(
            model, blocks, calib_data, keep, inputs.dtype
        )
    held = inputs.hidden[len(inputs.hidden) - inputs.heldout :]
    report.heldout_windows = sum(h.shape[0] for h in held)
    if reconstruct:
        inputs.hidden_fp = list(inputs.hidden)  # the full-precision model's


@dataclass
class _Loop:
    """One quantize run's block loop: where each block comes from (`load_block` or the model's
    own), where it is quantized (`device`) and where it goes when finished (`host`)."""

    blocks: nn.ModuleList
    prefix: str
    inputs: BlockInputs
    config: QuantConfig
    report: QuantReport
    calib_dtype: torch.dtype | None
    product_dtype: torch.dtype | None
    device: torch.device
    host: torch.device
    load_block: Callable[[int, torch.device], nn.Module] | None
    store: BlockStore | None

    def run(self, calib_data: Sequence[Tensor] | None, act_dtype: torch.dtype | None) -> None:
        """Every block in turn: those the store holds resumed, the others quantized."""
        done = 0
        if self.store is not None:
            self.store.identity.update(self.identity(calib_data, act_dtype))
            done = self.store.start(len(self.blocks))
        with logging_redirect_tqdm(), torch.no_grad():
            desc = f"quantizing W{self.config.bits}"
            bar = tqdm(range(len(self.blocks)), desc=desc, unit="block")
            for i in bar:
                if i < done:
                    self.resume(i)
                else:
                    self.quantize(i, bar)
                release_host_memory()  # the block's float weights, freed between packed layers

    def identity(self, calib_data, act_dtype) -> dict:
        """What the result depends on, besides the model (whose fingerprint the caller gives):
        a store holding another run's blocks is refused when any of it differs."""
        config = {k: v for k, v in self.config.to_dict().items() if k != "checkpoint_format"}
        return {
            "config": config,  # the checkpoint format only converts on saving: not compared
            "calibration": tensor_digest(calib_data),
            "calib_dtype": str(self.calib_dtype),
            "product_dtype": str(self.product_dtype),
            "act_dtype": str(act_dtype),
            "device": self.device.type,
            "torch": torch.__version__,
        }

    def fetch(self, i: int) -> nn.Module:
        """Block i with its full-precision weights, on the device."""
        block = self.load_block(i, self.device) if self.load_block else self.blocks[i]
        return block.to(self.device)

    def quantize(self, i: int, bar) -> None:
        """Quantize block i, move it to the host, save it (with a store)."""
        name, report = f"{self.prefix}.{i}", self.report
        block = self.fetch(i)
        first, recon = len(report.layers), len(report.reconstruction)
        quantize_block(
            block,
            name,
            self.inputs,
            self.config,
            report,
            self.calib_dtype,
            self.product_dtype,
            self.device,
        )
        log_block(name, report.layers[first:], bar)
        self.blocks[i] = block = block.to(self.host)
        if self.store is not None:
            done = (report.reconstruction[recon:] or [None])[0]
            self.store.save(i, block, report.layers[first:], done)

    def resume(self, i: int) -> None:
        """Block i as a finished run left it, and the next block's inputs recomputed from it:
        the same operations on the same values as in the run that quantized it."""
        inputs, device, report = self.inputs, self.device, self.report
        if inputs.hidden_fp is not None:  # the original block's outputs, before it is replaced
            original = self.fetch(i)
            with _autocast(device, self.calib_dtype):
                run_block_(original, inputs.hidden_fp, inputs.kwargs, device, inputs.dtype)
            del original
        block = self.blocks[i]
        name = f"{self.prefix}.{i}"
        layers, recon = self.store.load(i, block, self.config.bits, self.config.group_size, name)
        report.layers.extend(layers)
        if recon is not None:
            report.reconstruction.append(recon)
            report.reconstruction_seconds += recon.seconds
        if inputs.hidden is not None:
            block.to(device)
            with dequantize_cache(block), _autocast(device, self.calib_dtype):
                run_block_(block, inputs.hidden, inputs.kwargs, device, inputs.dtype)
        self.blocks[i] = block.to(self.host)


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
    teacher = None  # the end-to-end stage's targets: the full-precision model's, before any change
    e2e = config.reconstruct and config.recon_e2e_epochs > 0
    if e2e and config.recon_e2e_loss == "kl":
        k = config.recon_e2e_topk
        teacher = teacher_topk(model, calib_data, k, calib_dtype, device, load_block)
    if calib_data:
        keep = torch.device("cpu") if offload else device
        args = (report, config.reconstruct, device, keep, calib_dtype)
        _capture(model, blocks, calib_data, inputs, *args)
    parts = (blocks, prefix, inputs, config, report, calib_dtype, product_dtype, device)
    _Loop(*parts, model_device, load_block, store).run(calib_data, act_dtype)
    if e2e:  # the whole packed model on the device for this stage, then back
        model.to(device)
        report.e2e = train_scales_end_to_end(
            model, calib_data, teacher, heldout, config.recon_e2e_epochs, config.recon_e2e_lr,
            config.recon_eval_every, config.recon_patience, config.recon_seed, calib_dtype,
        )  # fmt: skip
        model.to(model_device)

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
