"""bitsandbytes NF4 (QLoRA's base): NF4 + double quantization, for training and evaluation.

`qdiablo.models.load_nf4` loads a Hugging Face folder or hub id with
`from_pretrained(quantization_config=bnb_nf4_config())`; a GGUF model (transformers refuses GGUF
plus quantization) is loaded in float and `quantize_bnb_4bit_` swaps its linear layers for
bitsandbytes `Linear4bit`, exactly as `from_pretrained` would build them. The output head and
the embeddings stay in float, as bitsandbytes leaves them.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qdiablo.optional import import_bitsandbytes

log = logging.getLogger(__name__)


def bnb_nf4_config(compute_dtype: torch.dtype = torch.float32):
    """QLoRA's quantization: NF4, double quantization, compute in `compute_dtype`."""
    from transformers import BitsAndBytesConfig  # deferred: seconds to import

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def quantize_bnb_4bit_(net: nn.Module, config) -> list[str]:
    """Swap every plain nn.Linear but the output head for a bitsandbytes Linear4bit, quantizing
    its weight with the settings of a `BitsAndBytesConfig`, in place; returns the layer names.

    Builds the same modules and packed weights that `from_pretrained(quantization_config=...)`
    does (tested), for models that only load in float (GGUF).
    """
    bnb = import_bitsandbytes()

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
        net.set_submodule(name, new)
    net.config.quantization_config = config
    net.is_loaded_in_4bit = True  # what from_pretrained sets; PEFT dispatches on it
    log.info("bitsandbytes %s: %d linear layers", config.bnb_4bit_quant_type, len(names))
    return names


def require_bitsandbytes() -> None:
    import_bitsandbytes(what="NF4 bases")
