"""Frozen bases to train adapters on: fp | gptq | rtn | nf4 | nf2.

- `fp`: the model's float weights, in `dtype` (bf16/fp16 gives the "16-bit" references).
- `gptq` / `rtn`: a folder written by `qdiablo quantize`; its linear layers stay packed
  (`quantizers.QuantLinear`) while training.
- `nf4`: bitsandbytes NF4 with double quantization (QLoRA's base). A Hugging Face folder or hub id
  goes through `from_pretrained(quantization_config=...)`; a GGUF model (transformers refuses GGUF
  plus quantization) is loaded in float and its linear layers are swapped for bitsandbytes
  `Linear4bit`, exactly as `from_pretrained` would build them.
- `nf2`: NF2 (absmax per block of 64), fake-quantized: see `qdiablo.train.nf`.

In every case the output head (`lm_head`) and the embeddings stay in float, as bitsandbytes leaves
them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qdiablo.errors import UserError
from qdiablo.models import load_model, load_tokenizer, parse_dtype
from qdiablo.nf4 import load_nf4
from qdiablo.train.config import BASE_KINDS

log = logging.getLogger(__name__)

PACKED_KINDS = ("gptq", "rtn")


@dataclass
class LoadedBase:
    """A frozen base model, its tokenizer, and what it is (for the run's records)."""

    model: nn.Module
    tokenizer: object
    kind: str
    description: str


def default_device() -> torch.device:
    """This process's device: its own GPU under a multi-GPU launch, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def load_base(
    kind: str,
    model: str,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: torch.device | str | None = None,
    packed_storage: str | torch.dtype = "int32",
) -> LoadedBase:
    """Load `model` as a frozen base of the given kind (see the module docstring).

    `packed_storage`: the dtype packed (gptq/rtn) layers hold their bytes in; see QuantLinear."""
    if kind not in BASE_KINDS:
        raise UserError(f"unknown base '{kind}'", hint=f"choose from {', '.join(BASE_KINDS)}")
    device = torch.device(device) if device is not None else default_device()
    torch_dtype = parse_dtype(dtype)
    if kind in PACKED_KINDS:
        storage = (
            getattr(torch, packed_storage) if isinstance(packed_storage, str) else packed_storage
        )
        net, tokenizer = _load_packed(kind, model, torch_dtype, device, storage)
        qc = net.config.quantization_config
        description = f"{model}, packed {kind} {qc.get('bits')}-bit g{qc.get('group_size')}"
    else:
        tokenizer = load_tokenizer(model, gguf_file)
        if kind == "nf4":
            net = load_nf4(model, gguf_file, torch_dtype, device)
            description = f"{model}, bitsandbytes NF4 + double quantization"
        else:
            net = load_model(model, gguf_file, dtype=torch_dtype, device=device)
            description = f"{model}, {str(torch_dtype).removeprefix('torch.')}"
            if kind == "nf2":
                from qdiablo.train.nf import fake_quantize_model_nf

                fake_quantize_model_nf(net, bits=2)
                description = f"{model}, NF2 fake-quantized (absmax per block of 64)"
    for p in net.parameters():
        p.requires_grad_(False)
    net.config.use_cache = False  # no KV cache while training
    return LoadedBase(net, tokenizer, kind, description)


# --------------------------------------------------------------------------------------------
# Packed GPTQ / RTN folders (quantizers package)
# --------------------------------------------------------------------------------------------


def _load_packed(
    kind: str,
    folder: str,
    dtype: torch.dtype,
    device: torch.device,
    storage_dtype: torch.dtype = torch.int32,
) -> tuple[nn.Module, object]:
    """A `qdiablo quantize` folder: QuantLinear layers stay packed (int32 codes, fp16 scales)."""
    try:
        from quantizers import CheckpointError, QuantLinear, load_quantized
    except ImportError as e:
        raise UserError(
            f"--base {kind} needs the quantizers package, which this build lacks",
            hint="use --base fp, nf4 or nf2",
        ) from e
    if not Path(folder).is_dir():
        raise UserError(
            f"--base {kind} needs --model to be a folder written by `qdiablo quantize`, "
            f"not '{folder}'",
            hint="quantize first: qdiablo quantize --model ... --output FOLDER",
        )
    try:
        if device.type == "meta":  # FSDP's sharded loading fills it later, shard by shard
            from qdiablo.train.fsdp_loading import packed_base_on_meta

            net = packed_base_on_meta(folder, dtype, storage_dtype)
        else:
            net = load_quantized(folder, device=device, storage_dtype=storage_dtype)
    except CheckpointError as e:
        raise UserError(str(e)) from e
    method = getattr(getattr(net, "quant_config", None), "method", None)
    if method is not None and method != kind:
        raise UserError(
            f"--base {kind}: {folder} was quantized with {method}",
            hint=f"use --base {method}",
        )
    # Cast only the float parameters (embeddings, norms, head): the packed layers keep their
    # bytes (int32 codes and fp16 scales, whatever their storage dtype), which a cast would ruin.
    packed = {id(p) for m in net.modules() if isinstance(m, QuantLinear) for p in m.parameters()}
    for param in net.parameters():
        if param.is_floating_point() and param.dtype != dtype and id(param) not in packed:
            param.data = param.data.to(dtype)
    packed = sum(isinstance(m, QuantLinear) for m in net.modules())
    log.info("loaded %s: %d packed layers (%s)", folder, packed, method or "gptq layout")
    try:
        tokenizer = load_tokenizer(folder)
    except UserError as e:
        raise UserError(
            f"{folder} holds no tokenizer", hint="quantize with the tokenizer saved alongside"
        ) from e
    return net, tokenizer
