"""The model of a GPTQ-layout folder, built before any tensor is read: its QuantLinear layers in
place and every tensor of the files checked against it (present, expected, shape, dtype), so a
damaged or foreign checkpoint fails with one line before anything loads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantizers.checkpoint.files import SAFETENSORS_DTYPES, read_headers, weight_files
from quantizers.checkpoint.settings import CheckpointError, read_entry
from quantizers.config import QuantConfig
from quantizers.quant_linear import QuantLinear

PACKED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")

Headers = dict[str, tuple[Path, dict[str, Any]]]


def quantized_skeleton(
    directory: str | os.PathLike,
    storage_dtype: torch.dtype = torch.int32,
    packed_device: torch.device | str = "meta",
) -> tuple[nn.Module, dict[str, Path]]:
    """The model of a GPTQ-layout folder with its QuantLinear layers in place, every tensor
    checked against the files' headers but none loaded: float weights on `meta`, packed tensors
    on `packed_device` (zeros), non-persistent buffers (rotary tables) real. Returns the model
    (with `quant_config` and `config.quantization_config` set) and the tensor name → file map."""
    directory = Path(directory)
    entry, config = read_entry(directory)
    # The files first: every tensor present in full, before any model is built.
    files = weight_files(directory)
    headers = read_headers(files)
    first = next(iter(files.values()))  # the file errors name when no single one is at fault
    model = _empty_model(directory)
    quantized = sorted({k.rsplit(".", 1)[0] for k in headers if k.endswith(PACKED_SUFFIXES)})
    if not quantized:
        raise CheckpointError(f"{directory}: no '*.qweight' tensors: not a GPTQ checkpoint")
    _swap_in_quant_linears(model, quantized, headers, first, config, storage_dtype, packed_device)
    _check_tensors(model, headers, first, config, quantized)
    model.config.quantization_config = entry
    model.quant_config = config
    return model, {key: file for key, (file, _) in headers.items()}


def _empty_model(directory: Path) -> nn.Module:
    """The folder's architecture with every weight on the meta device (no quantization_config:
    transformers would send a GPTQ config to GPTQModel)."""
    # Deferred: transformers and accelerate take seconds to import; only loading needs them.
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(directory)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(hf_config)


def _swap_in_quant_linears(
    model: nn.Module,
    quantized: list[str],
    headers: Headers,
    first: Path,
    config: QuantConfig,
    storage_dtype: torch.dtype,
    packed_device: torch.device | str,
) -> None:
    """Replace each nn.Linear the files hold packed tensors for by an empty QuantLinear."""
    for name in quantized:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"{first}: tensor '{name}.qweight' names no module of {type(model).__name__}"
            ) from None
        if not isinstance(lin, nn.Linear):
            raise CheckpointError(f"{name}: expected nn.Linear to hold a quantized layer")
        bias = headers.get(f"{name}.bias")
        bias_dtype = SAFETENSORS_DTYPES.get(bias[1]["dtype"]) if bias is not None else None
        try:
            q = QuantLinear(
                lin.in_features,
                lin.out_features,
                config.bits,
                config.group_size,
                bias=bias is not None,
                bias_dtype=bias_dtype or torch.float32,
                device=packed_device,
                storage_dtype=storage_dtype,
            )
        except ValueError as e:
            raise CheckpointError(f"{name}: {e}") from e
        model.set_submodule(name, q)
    return quantized


def _check_tensors(
    model: nn.Module, headers: Headers, first: Path, config: QuantConfig, quantized: list[str]
) -> None:
    """Every tensor the model expects is in the files (or tied to one that is), and every tensor
    of the files is one the model expects, of its shape; packed integers are int32."""
    expected = model.state_dict(keep_vars=True)
    tied = tied_keys(model, set(headers))
    for key in expected:
        if key not in headers and key not in tied:
            raise CheckpointError(f"{first}: tensor '{key}' is missing from the checkpoint")
    packed = set(quantized)
    for key, (file, info) in headers.items():
        if key not in expected:
            raise CheckpointError(
                f"{file}: unexpected tensor '{key}', which {type(model).__name__} with "
                f"bits={config.bits}, group_size={config.group_size} does not have"
            )
        want = expected[key]
        shape = tuple(info["shape"])
        if shape != tuple(want.shape):
            raise CheckpointError(
                f"{file}: tensor '{key}' has shape {list(shape)}, expected {list(want.shape)} "
                f"(bits={config.bits}, group_size={config.group_size})"
            )
        stored = SAFETENSORS_DTYPES.get(info["dtype"])
        packed_int = key.endswith((".qweight", ".qzeros", ".g_idx"))
        if packed_int and key.rpartition(".")[0] in packed and stored != torch.int32:
            raise CheckpointError(f"{file}: tensor '{key}' is {info['dtype']}, expected I32")


def tied_keys(model: nn.Module, present: set[str]) -> set[str]:
    """Keys that may be absent from the file because they are tied to a key that is present
    (e.g. lm_head.weight to model.embed_tokens.weight)."""
    pairs = dict(getattr(model, "all_tied_weights_keys", None) or {})
    tied = set()
    for target, source in pairs.items():
        if source in present:
            tied.add(target)
        if target in present:
            tied.add(source)
    seen: dict[int, str] = {}
    for key, p in model.state_dict(keep_vars=True).items():  # parameters shared in memory
        if id(p) in seen and seen[id(p)] in present:
            tied.add(key)
        seen.setdefault(id(p), key)
    return tied
