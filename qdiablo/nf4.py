"""bitsandbytes NF4 bases (QLoRA's): NF4 + double quantization, for training and evaluation.

A Hugging Face folder or hub id goes through `from_pretrained(quantization_config=...)`; a GGUF
model (transformers refuses GGUF plus quantization) is loaded in float and its linear layers are
swapped for bitsandbytes `Linear4bit`, exactly as `from_pretrained` would build them. The output
head and the embeddings stay in float, as bitsandbytes leaves them.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qdiablo.errors import UserError
from qdiablo.models import load_model, resolve_model

log = logging.getLogger(__name__)


def bnb_nf4_config(compute_dtype: torch.dtype = torch.float32):
    """QLoRA's quantization: NF4, double quantization, compute in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_nf4(
    model: str, gguf_file: str | None, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    require_bitsandbytes()
    path, gguf = resolve_model(model, gguf_file)
    config = bnb_nf4_config(dtype)
    if gguf is None:
        from transformers import AutoModelForCausalLM

        log.info("loading %s with bitsandbytes NF4 (double quantization)", path)
        try:
            return AutoModelForCausalLM.from_pretrained(
                path, quantization_config=config, device_map={"": device}, dtype=dtype
            )
        except OSError as e:
            raise UserError(f"could not load a model from '{model}': {e}") from e
    net = load_model(model, gguf_file, dtype=dtype, device=device)
    quantize_bnb_4bit_(net, config)
    return net


def quantize_bnb_4bit_(net: nn.Module, config) -> list[str]:
    """Swap every plain nn.Linear but the output head for a bitsandbytes Linear4bit, quantizing
    its weight with the settings of a `BitsAndBytesConfig`, in place; returns the layer names.

    Builds the same modules and packed weights that `from_pretrained(quantization_config=...)`
    does (tested), for models that only load in float (GGUF).
    """
    import bitsandbytes as bnb

    head = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    names = [n for n, m in net.named_modules() if type(m) is nn.Linear and m is not head]
    for name in names:
        old = net.get_submodule(name)
        new = bnb.nn.Linear4bit(
            old.in_features,
            old.out_features,
            bias=old.bias is not None,
            compute_dtype=config.bnb_4bit_compute_dtype,
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type,
            quant_storage=config.bnb_4bit_quant_storage,
            device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            old.weight.data.contiguous(),
            requires_grad=False,
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type,
            quant_storage=config.bnb_4bit_quant_storage,
            module=new,
        ).to(old.weight.device)  # Params4bit quantizes on its first move to a device
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data, requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent_name) if parent_name else net, child, new)
    net.config.quantization_config = config
    net.is_loaded_in_4bit = True  # what from_pretrained sets; PEFT dispatches on it
    log.info("bitsandbytes %s: %d linear layers", config.bnb_4bit_quant_type, len(names))
    return names


def require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise UserError("NF4 bases need bitsandbytes", hint='pip install -e ".[qlora]"') from e
