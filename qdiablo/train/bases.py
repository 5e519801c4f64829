"""Frozen bases to train adapters on: `qdiablo train --base fp | gptq | rtn | nf4 | nf2`.

The model itself comes from `qdiablo.models.load_base` (the one loader; its docstring describes
each kind). Training adds the tokenizer, freezes every weight, turns the KV cache off and records
what the base is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qdiablo.devices import resolve_device
from qdiablo.errors import UserError
from qdiablo.kinds import PACKED_KINDS, TRAIN_BASE_KINDS
from qdiablo.models import load_base, load_tokenizer, parse_dtype


@dataclass
class LoadedBase:
    """A frozen base model, its tokenizer, and what it is (for the run's records)."""

    model: nn.Module
    tokenizer: object
    kind: str
    description: str


def default_device() -> torch.device:
    """This process's device: its own GPU under a multi-GPU launch, else the CPU (the one
    device rule, qdiablo.devices)."""
    return resolve_device("auto")


def load_training_base(
    kind: str,
    model: str,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: torch.device | str | None = None,
    packed_storage: str | torch.dtype = "int32",
) -> LoadedBase:
    """Load `model` as a frozen base of the given kind, with its tokenizer.

    `packed_storage`: the dtype packed (gptq/rtn) layers hold their bytes in (see QuantLinear);
    `device="meta"` builds a packed base without reading its tensors (FSDP's sharded loading)."""
    if kind not in TRAIN_BASE_KINDS:
        raise UserError(f"unknown base '{kind}'", hint=f"choose from {', '.join(TRAIN_BASE_KINDS)}")
    device = torch.device(device) if device is not None else default_device()
    torch_dtype = parse_dtype(dtype)
    if kind not in PACKED_KINDS:  # a missing tokenizer fails before the model loads
        tokenizer = load_tokenizer(model, gguf_file)
    net = load_base(
        model,
        kind,
        gguf_file=gguf_file,
        dtype=torch_dtype,
        device=device,
        packed_storage=packed_storage,
    )
    if kind in PACKED_KINDS:
        try:
            tokenizer = load_tokenizer(model)
        except UserError as e:
            raise UserError(
                f"{model} holds no tokenizer", hint="quantize with the tokenizer saved alongside"
            ) from e
        qc = net.config.quantization_config
        description = f"{model}, packed {kind} {qc.get('bits')}-bit g{qc.get('group_size')}"
    else:
        description = {
            "nf4": f"{model}, bitsandbytes NF4 + double quantization",
            "nf2": f"{model}, NF2 fake-quantized (absmax per block of 64)",
        }.get(kind, f"{model}, {str(torch_dtype).removeprefix('torch.')}")
    for p in net.parameters():
        p.requires_grad_(False)
    net.config.use_cache = False  # no KV cache while training
    return LoadedBase(net, tokenizer, kind, description)
