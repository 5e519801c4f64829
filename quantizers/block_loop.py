"""The block-by-block loop of quantize_model: what it carries from one decoder block to the next
(`BlockInputs`), one block quantized (`quantize_block`: the registered steps and method per
group of layers sharing an input, then the block steps), and the loop over the blocks with
resuming (`BlockLoop`). The memory this takes is written out in docs/scale.md.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from quantizers.calibration import (
    block_linears,
    capture_block_inputs,
    collect_hessians,
    input_groups,
    run_block_,
)
from quantizers.config import QuantConfig
from quantizers.fileio import release_host_memory
from quantizers.quant_linear import dequantize_cache
from quantizers.registry import steps
from quantizers.report import QuantReport, log_block
from quantizers.resume import BlockStore, tensor_digest
from quantizers.weights import quantize_group

log = logging.getLogger("quantizers.quantize")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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
    for step in steps(config, "block"):  # reconstruction (quantizers/methods/reconstruct.py)
        rec = step.run(block, hidden, kwargs, inputs, config, calib_dtype, name)
        report.reconstruction.append(rec)
        report.reconstruction_seconds += rec.seconds
    with dequantize_cache(block), _autocast(device, calib_dtype):
        run_block_(block, hidden, kwargs, device, inputs.dtype)


def capture_inputs(
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
class BlockLoop:
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
