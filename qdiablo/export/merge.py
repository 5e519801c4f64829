"""Merging an adapter into its quantized base, and re-quantizing the merged model.

W_merged = W + Dᵀ with W the *dequantized* base weight the blocks were trained against, never
the original fp16 weight (docs/diablo.md §5). Layers without an adapter are dequantized as they
are, so the merged model is a plain Hugging Face model that any tool loads. Merging back into
integers means re-quantizing (MagR + GPTQ on calibration data), which changes the outputs: the
change is measured and reported, never hidden.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdiablo.diablo import DiaBloModel
from qdiablo.errors import UserError
from quantizers import QuantLinear, quantize_model

log = logging.getLogger(__name__)


def merge_into_dense(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Fold a DiaBlo adapter into its base and return a plain model in `dtype` (no packed layers).

    `model` is a DiaBloModel on a quantized base (as load_exported returns it); it is consumed.
    W + Dᵀ is computed in float32 and cast once, layer by layer, so a float16 merge of a large
    model never holds a float32 copy of it.
    """
    if not isinstance(model, DiaBloModel):
        raise UserError(
            f"--merged needs a DiaBlo adapter; this one is {type(model).__name__}",
            hint="export a PEFT (LoRA) adapter without --merged, or merge it with PEFT",
        )
    dense = model.merge_and_unload(dtype=dtype)
    for name, module in list(dense.named_modules()):
        if isinstance(module, QuantLinear):
            lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            lin.weight.data = module.dequantize_weight(torch.float32).to(dtype).contiguous()
            if module.bias is not None:
                lin.bias.data = module.bias.detach().to(dtype).clone()
            dense.set_submodule(name, lin)
    dense.to(dtype)
    # It is no longer a GPTQ model: a config that says so would send transformers to GPTQModel.
    if hasattr(dense.config, "quantization_config"):
        del dense.config.quantization_config
    if "quant_config" in dense.__dict__:
        del dense.__dict__["quant_config"]
    for p in dense.parameters():
        p.requires_grad_(False)
    return dense.eval()


def save_merged(model: nn.Module, folder: Path, dtype: torch.dtype, tokenizer=None) -> None:
    """Save a merged model as a plain HF folder in `dtype`, leaving `model` in its own dtype
    (re-quantization starts from the float32 weights, not the rounded ones)."""
    state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    model.save_pretrained(folder, state_dict=state)
    # save_pretrained records the model's own dtype (float32); from_pretrained's "auto" reads it.
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["dtype"] = str(dtype).removeprefix("torch.")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


@torch.no_grad()
def _logits(model: nn.Module, windows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=w).logits.float() for w in windows]


def requantize(
    model: nn.Module,
    calib: list[torch.Tensor],
    config: Any,
    probe_windows: int = 4,
) -> dict[str, Any]:
    """Quantize the merged float model in place with `config` (a QuantConfig) and return the
    measured change of the logits on the first `probe_windows` calibration windows."""
    windows = [w.unsqueeze(0) for batch in calib for w in batch][:probe_windows]
    before = _logits(model, windows)
    log.warning(
        "re-quantizing the merged model (%s, %d-bit, group size %d%s%s): this changes its outputs",
        config.method,
        config.bits,
        config.group_size,
        ", MagR" if config.magr else "",
        ", block-wise reconstruction" if config.reconstruct else "",
    )
    quantize_model(model, calib, config)
    after = _logits(model, windows)
    diffs = torch.cat([(a - b).abs().flatten() for a, b in zip(after, before)])
    scale = max(b.abs().max().item() for b in before)
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(after, before))
    tokens = sum(b.shape[1] for b in before)
    change = {
        "windows": len(windows),
        "tokens": tokens,
        "max_abs_logit_change": diffs.max().item(),
        "mean_abs_logit_change": diffs.mean().item(),
        "max_abs_logit": scale,
        "top1_agreement": agree / tokens if tokens else None,
    }
    log.warning(
        "re-quantization changed the logits by max %.4g, mean %.4g (max |logit| %.4g; top-1 "
        "agreement %.1f%%) on %d calibration windows",
        change["max_abs_logit_change"],
        change["mean_abs_logit_change"],
        scale,
        100 * (change["top1_agreement"] or 0),
        len(windows),
    )
    return change
