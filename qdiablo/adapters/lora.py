"""LoRA through PEFT itself, so the baselines are the ecosystem's LoRA:
- on nn.Linear and bitsandbytes Linear4bit bases PEFT dispatches its own layers (QLoRA);
- on packed `quantizers.QuantLinear` layers (GPTQ-LoRA), PEFT's custom-module dispatch maps the
  packed class to PEFT's own `GPTQLoraLinear`, the LoRA layer PEFT uses for GPTQModel's packed
  layers: it calls the packed layer, then adds `B(A(dropout(x)))·alpha/r`.
"""

from __future__ import annotations

import warnings

from torch import nn

from qdiablo.adapters.common import adapted_layers
from qdiablo.optional import import_peft


def packed_layer_types(model: nn.Module, target_modules: list[str] | str) -> set[type]:
    """Classes of targeted layers that PEFT has no LoRA layer for: packed integer layers that
    dequantize themselves (`dequantize_weight`), such as quantizers.QuantLinear."""
    types = set()
    for layer in adapted_layers(model, target_modules):
        module = model.get_submodule(layer.name)
        if hasattr(module, "dequantize_weight") and not isinstance(module, nn.Linear):
            types.add(type(module))
    return types


def dispatch_packed_layers(config, model: nn.Module, target_modules: list[str] | str) -> None:
    """Tell PEFT to wrap our packed layers with its GPTQ LoRA layer (GPTQ-LoRA).

    `LoraConfig._register_custom_module` is PEFT's documented, experimental hook for custom
    layer types ("Custom models" in PEFT's developer guide); it has no public name yet.
    """
    GPTQLoraLinear = import_peft("peft.tuners.lora.gptq").GPTQLoraLinear

    packed = packed_layer_types(model, target_modules)
    if packed:
        config._register_custom_module(dict.fromkeys(packed, GPTQLoraLinear))


def attach_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    target_modules: list[str] | str,
    dropout: float,
):
    """Freeze the base and add PEFT LoRA (A Kaiming-uniform, B zero) to the targets."""
    peft = import_peft(what="--adapter lora")
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    dispatch_packed_layers(config, model, target_modules)
    with warnings.catch_warnings():
        # PEFT warns "Unsupported layer type" for custom-dispatched layers it reads in/out from
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    return peft_model


def load_lora(model: nn.Module, adapter_dir: str, is_trainable: bool = False):
    """Load a saved PEFT LoRA adapter onto a base, packed bases (GPTQ-LoRA) included.

    PEFT does not save the custom-module mapping that GPTQ-LoRA was trained with, so a plain
    `PeftModel.from_pretrained` refuses QuantLinear targets; this registers it again first.
    """
    peft = import_peft()
    LoraConfig, PeftModel = peft.LoraConfig, peft.PeftModel

    config = LoraConfig.from_pretrained(str(adapter_dir))
    targets = config.target_modules
    dispatch_packed_layers(config, model, targets if isinstance(targets, str) else sorted(targets))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        return PeftModel.from_pretrained(
            model, str(adapter_dir), config=config, is_trainable=is_trainable
        )
