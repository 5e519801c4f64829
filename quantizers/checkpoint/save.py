"""save_quantized: a quantized model written as a GPTQ-layout folder (staged: only the files
written here are replaced)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor, nn

from quantizers.checkpoint.settings import (
    FORMAT_VERSION,
    QUANTIZE_CONFIG_NAME,
    REPORT_MD_NAME,
    REPORT_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    quant_config_of,
)
from quantizers.fileio import staged_dir, write_json
from quantizers.packing import zeros_v2_to_v1
from quantizers.quant_linear import QuantLinear

log = logging.getLogger("quantizers.checkpoint")


def unique_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict without tied duplicates (a tied lm_head is stored once, as the
    embedding), every tensor contiguous. Not `safetensors.torch.save_model`, which drops shared
    tensors too but saves the model's own state dict: this file holds converted tensors (v1
    zero points, every tensor on the host)."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out: dict[str, Tensor] = {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and ident in seen:
            continue
        seen[ident] = key
        out[key] = t.detach().contiguous()
    return out


def save_quantized(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer=None,
    claim: Callable[[list[str]], None] | None = None,
) -> Path:
    """Write `model` (quantized by quantize_model or loaded by load_quantized) as a HF folder.

    Only the files written here are replaced in `directory`; other files stay. `claim` is called
    with their names just before they move into place (the CLI records them as its own)."""
    directory = Path(directory)
    config = quant_config_of(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise CheckpointError("the model has no QuantLinear layers: run quantize_model first")
    for name, m in layers.items():
        if m.bits != config.bits:
            raise CheckpointError(f"{name}: {m.bits}-bit layer in a {config.bits}-bit model")
    state = unique_state_dict(model)
    if config.checkpoint_format == "gptq":
        for name, m in layers.items():
            qzeros = m.packed_tensors().qzeros.cpu()
            state[f"{name}.qzeros"] = zeros_v2_to_v1(qzeros, m.bits, m.out_features, name)
    state = {k: v.cpu() for k, v in state.items()}
    entry = config.quantization_config()
    entry.setdefault("meta", {})["qdiablo_format_version"] = FORMAT_VERSION
    with staged_dir(directory, claim) as tmp:
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        previous = getattr(model.config, "quantization_config", None)
        model.config.quantization_config = entry
        try:
            model.config.save_pretrained(tmp)
        finally:
            model.config.quantization_config = previous if previous is not None else entry
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            with contextlib.suppress(Exception):
                generation.save_pretrained(tmp)
        write_json(tmp / QUANTIZE_CONFIG_NAME, entry)
        report = getattr(model, "quantization_report", None)
        if report is not None:
            write_json(tmp / REPORT_NAME, report.to_dict())
            (tmp / REPORT_MD_NAME).write_text(report.to_markdown(), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    log.info(
        "saved %d quantized layers to %s (%s)", len(layers), directory, config.checkpoint_format
    )
    return directory
