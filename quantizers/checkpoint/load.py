"""load_quantized: a GPTQ-layout folder into a model of QuantLinear layers, strictly: the
skeleton checks every tensor first, then the values a kernel trusts are checked as they load."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from quantizers.checkpoint.settings import CheckpointError
from quantizers.checkpoint.skeleton import quantized_skeleton
from quantizers.packing import zeros_v1_to_v2
from quantizers.quant_linear import QuantLinear

log = logging.getLogger("quantizers.checkpoint")


def load_quantized(
    directory: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    storage_dtype: torch.dtype = torch.int32,
) -> nn.Module:
    """Load a folder written by save_quantized (or a GPTQ-layout export) into QuantLinear layers.

    dtype: cast the unquantized weights (embeddings, norms, lm_head, biases); packed tensors and
    fp16 scales stay as stored. Default: as stored.
    storage_dtype: the dtype QuantLinear holds its packed bytes in (see QuantLinear).
    """

    directory = Path(directory)
    model, files = quantized_skeleton(directory, storage_dtype, packed_device="meta")
    config = model.quant_config
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    state: dict[str, Tensor] = {}
    for file in sorted(set(files.values())):
        state.update(load_file(file))
    for name in quantized:
        check_packed(name, state, files[f"{name}.scales"])
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    left = [k for k, v in model.state_dict().items() if v.is_meta]
    if left:
        raise CheckpointError(f"{directory}: tensors never loaded: {left[:5]}")
    if config.checkpoint_format == "gptq":
        for name in quantized:
            q = model.get_submodule(name)
            qzeros = q.packed_tensors().qzeros
            zeros, wrapped = zeros_v1_to_v2(qzeros, q.bits, q.out_features)
            qzeros.copy_(zeros)
            if wrapped:
                log.warning(
                    "%s: %d v1 zero points are stored as %d (a wrapped zero of 0); read as 0",
                    name,
                    wrapped,
                    2**q.bits - 1,
                )
    if dtype is not None:
        model.to(dtype)
    model.to(device)
    model.eval()
    return model


def check_packed(name: str, state: dict[str, Tensor], file: Path) -> None:
    """Values a kernel trusts: g_idx indexes scales without bounds checks (on a GPU a crafted
    g_idx reads out of bounds), and a zero or non-finite scale poisons every output. Codes and
    zero points need no check: every b-bit field of the packed words decodes into [0, 2^b)."""
    scales = state[f"{name}.scales"]
    groups = scales.shape[0]
    g_idx = state.get(f"{name}.g_idx")
    if g_idx is not None and g_idx.numel():
        low, high = int(g_idx.min()), int(g_idx.max())
        if low < 0 or high >= groups:
            raise CheckpointError(
                f"{file}: tensor '{name}.g_idx' holds values {low}..{high}, outside [0, {groups}) "
                f"(the layer has {groups} groups)"
            )
    bad = ~torch.isfinite(scales.float()) | (scales == 0)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise CheckpointError(
            f"{file}: tensor '{name}.scales' holds {int(bad.sum())} zero or non-finite "
            f"value(s), the first at {where}"
        )
