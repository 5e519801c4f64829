"""What the memory planner knows of a model: its `config.json`, and the model built from it on
the meta device (no weight is read or allocated), packed and wrapped as training would do it.

A model is named by a local folder holding `config.json` (nothing else is read: a folder with
only that file works; a `qdiablo quantize` folder also gives its bits and group size), a hub id
(only `config.json` is fetched, or read from the hub cache), `smollm2` (the embedded GGUF's
header), or one of the shapes in `PRESETS` (the issue tables' LLaMA models, no file needed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdiablo.errors import UserError

# name: LLaMA shape (hidden, intermediate, layers, heads, kv heads, vocab): the models of the
# issue tables and of benchmarks/fsdp_memory_plan.py, and TinyLlama's (the synthetic 1.1B).
PRESETS: dict[str, dict[str, int]] = {
    "llama-2-7b": dict(hidden=4096, inter=11008, layers=32, heads=32, kv=32, vocab=32000),
    "llama-2-13b": dict(hidden=5120, inter=13824, layers=40, heads=40, kv=40, vocab=32000),
    "llama-2-70b": dict(hidden=8192, inter=28672, layers=80, heads=64, kv=8, vocab=32000),
    "llama-3.1-8b": dict(hidden=4096, inter=14336, layers=32, heads=32, kv=8, vocab=128256),
    "llama-3.1-70b": dict(hidden=8192, inter=28672, layers=80, heads=64, kv=8, vocab=128256),
    "llama-3.1-405b": dict(hidden=16384, inter=53248, layers=126, heads=128, kv=8, vocab=128256),
    "tinyllama-1.1b": dict(hidden=2048, inter=5632, layers=22, heads=32, kv=4, vocab=32000),
}
QUANTIZE_CONFIG = "quantize_config.json"


@dataclass(frozen=True)
class ModelShape:
    """The sizes the arithmetic needs, read from a transformers config."""

    name: str
    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config: Any, name: str) -> ModelShape:
        text = getattr(config, "get_text_config", lambda: config)()
        heads = int(text.num_attention_heads)
        hidden = int(text.hidden_size)
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        return cls(
            name=name,
            model_type=str(getattr(text, "model_type", "")),
            layers=int(text.num_hidden_layers),
            hidden=hidden,
            intermediate=int(getattr(text, "intermediate_size", None) or 4 * hidden),
            heads=heads,
            kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            vocab=int(text.vocab_size),
            tied=bool(getattr(config, "tie_word_embeddings", False)),
        )


@dataclass(frozen=True)
class ModelSource:
    """A model's config and, for a `qdiablo quantize` folder, its bits and group size."""

    config: Any
    shape: ModelShape
    bits: int | None = None
    group_size: int | None = None


def preset_config(name: str) -> Any:
    from transformers import LlamaConfig  # deferred: seconds to import

    spec = PRESETS[name]
    return LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        intermediate_size=spec["inter"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv"],
        tie_word_embeddings=False,
    )


def load_source(model: str, gguf_file: str | None = None) -> ModelSource:
    """The config of `model` (see the module docstring), reading config.json and nothing else."""
    from transformers import AutoConfig  # deferred: seconds to import

    from qdiablo.sources import SMOLLM2, resolve_model

    if model.lower() in PRESETS:
        config = preset_config(model.lower())
        return ModelSource(config, ModelShape.from_config(config, model.lower()))
    path, gguf = resolve_model(model, gguf_file)
    folder = Path(path)
    if model != SMOLLM2 and folder.is_dir() and not (folder / "config.json").is_file():
        raise UserError(
            f"{model} holds no config.json",
            hint="the planner reads only a model's config.json; or name a preset: "
            + ", ".join(PRESETS),
        )
    try:
        kwargs = {"gguf_file": gguf} if gguf else {}
        config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(
            f"could not read the config of '{model}': {str(e).splitlines()[0]}",
            hint="pass a folder holding config.json, a hub id, smollm2, or a preset: "
            + ", ".join(PRESETS),
        ) from e
    bits = group = None
    if folder.is_dir() and (folder / QUANTIZE_CONFIG).is_file():
        quant = json.loads((folder / QUANTIZE_CONFIG).read_text(encoding="utf-8"))
        bits, group = int(quant["bits"]), int(quant["group_size"])
    return ModelSource(config, ModelShape.from_config(config, model), bits, group)


def build_on_meta(
    config: Any,
    bits: int | None,
    group_size: int,
    float_dtype: torch.dtype,
    adapter: str | None = None,
    num_blocks: int = 64,
    targets: list[str] | str | None = None,
) -> nn.Module:
    """The training model on the meta device: every linear layer of the decoder blocks packed
    as a `QuantLinear` (none when `bits` is None: a float base), float parameters in
    `float_dtype`, and the adapter `adapter` names attached to the targets where its method
    counts from the model (`AdapterMethod.plan_attach`: DiaBlo; LoRA is counted from the layer
    shapes, not attached)."""
    from transformers import AutoModelForCausalLM  # deferred: seconds to import

    from quantizers import QuantLinear
    from quantizers.calibration import find_decoder_blocks

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).to(float_dtype)
    model.eval()
    if bits is not None:
        _, blocks = find_decoder_blocks(model)
        for name, module in list(blocks.named_modules()):
            if type(module) is nn.Linear:
                packed = QuantLinear(
                    module.in_features,
                    module.out_features,
                    bits,
                    group_size,
                    bias=module.bias is not None,
                    bias_dtype=float_dtype,
                    device="meta",
                )
                blocks.set_submodule(name, packed)
    for p in model.parameters():
        p.requires_grad_(False)
    if adapter is not None:  # a registered method: attached if it counts from the model
        from qdiablo.adapters.registry import get_adapter

        return get_adapter(adapter).plan_attach(model, num_blocks, targets)
    return model
