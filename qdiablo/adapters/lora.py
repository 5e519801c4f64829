"""LoRA through PEFT itself, so the baselines are the ecosystem's LoRA:
- on nn.Linear and bitsandbytes Linear4bit bases PEFT dispatches its own layers (QLoRA);
- on packed `quantizers.QuantLinear` layers (GPTQ-LoRA), PEFT's custom-module dispatch maps the
  packed class to PEFT's own `GPTQLoraLinear`, the LoRA layer PEFT uses for GPTQModel's packed
  layers: it calls the packed layer, then adds `B(A(dropout(x)))·alpha/r`.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdiablo.adapters.budget import Budget, Shape, diablo_parameters, lora_parameters
from qdiablo.adapters.common import adapted_layers, copy_full_, is_dtensor, trainable_named
from qdiablo.adapters.method import AdapterMethod
from qdiablo.health import NONFINITE_HINT, require_finite
from qdiablo.io import check_adapter_tensors, read_adapter_weights
from qdiablo.optional import import_peft, loaded


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


def is_peft_model(model: nn.Module) -> bool:
    peft = loaded("peft")  # a PEFT model exists only once peft is imported
    return peft is not None and isinstance(model, peft.PeftModel)


class LoraMethod(AdapterMethod):
    """PEFT LoRA (rank r, alpha, A Kaiming-uniform and B zero); any other PEFT adapter folder
    loads through it too (`PeftModel.from_pretrained`)."""

    name = "lora"
    title = "LoRA"
    default_lr = 3e-4  # ApiQ's LoRA setting
    setting = "rank"
    library_name = "peft"

    @property
    def config_class(self) -> type:  # PEFT's, imported when asked for
        return import_peft(what="--adapter lora").LoraConfig

    # ---- training ---------------------------------------------------------------------------

    def trainable_count(self, shapes: Sequence[Shape], budget: Budget) -> int:
        return lora_parameters(shapes, budget.rank)

    def matched(self, budget: Budget, shapes: Sequence[Shape]) -> dict[str, Any]:
        n = budget.matched_num_blocks
        count = diablo_parameters(shapes, n)
        return {"adapter": "diablo", "num_blocks": n, "trainable_parameters": count}

    def describe(self, num_blocks: int | None, rank: int | None) -> str:
        return f"r={rank}"

    def attach(self, model: nn.Module, targets, budget: Budget, config: Any):
        alpha = config.lora_alpha if config.lora_alpha is not None else 2.0 * budget.rank
        return attach_lora(model, budget.rank, alpha, targets, config.dropout)

    def prepare_for_trainer(self, model: nn.Module) -> None:
        pass  # Trainer recognises a PeftModel itself

    # ---- the live model ---------------------------------------------------------------------

    def owns(self, model: nn.Module) -> bool:
        return is_peft_model(model)

    def save(self, model: nn.Module, folder: Path, gathered) -> None:
        model.save_pretrained(str(folder), save_embedding_layers=False, state_dict=gathered)

    def load_weights(self, model: nn.Module, folder: Path) -> None:
        utils = import_peft("peft.utils")
        path = folder / "adapter_model.safetensors"
        tensors = read_adapter_weights(path)
        require_finite(tensors.items(), str(path), hint=NONFINITE_HINT)
        expected = utils.get_peft_model_state_dict(model)
        check_adapter_tensors(path, {k: tuple(v.shape) for k, v in expected.items()}, tensors)
        trainable = dict(trainable_named(model))
        if any(is_dtensor(p) for p in trainable.values()):  # sharded by FSDP: copy each shard
            adapter = getattr(model, "active_adapter", "default")
            for name, param in trainable.items():
                copy_full_(param, tensors[name.replace(f".{adapter}.", ".")])
            return
        utils.set_peft_model_state_dict(model, tensors)

    def initial_value(self, name: str, param: torch.Tensor, seed: int) -> torch.Tensor:
        """B at zero; A from a generator seeded per layer, Kaiming-uniform(a=√5) as PEFT."""
        if ".lora_A." not in name:
            return torch.zeros(param.shape, dtype=torch.float32)
        digest = hashlib.sha256(name.encode()).hexdigest()
        g = torch.Generator().manual_seed(seed + int(digest[:8], 16))
        full = torch.empty(param.shape, dtype=torch.float32)
        bound = 1 / math.sqrt(param.shape[1])
        return full.uniform_(-bound, bound, generator=g)

    def is_adapter_tensor(self, name: str) -> bool:
        return ".lora_" in name

    # ---- a saved folder ---------------------------------------------------------------------

    def recognizes(self, config: Mapping[str, Any]) -> str | None:
        return str(config["peft_type"]).lower() if config.get("peft_type") else None

    def load(self, model: nn.Module, folder: Path, kind: str, *, force: bool = False):
        weights = folder / "adapter_model.safetensors"
        if weights.is_file():
            tensors = read_adapter_weights(weights).items()
            require_finite(tensors, f"adapter {weights}", hint=NONFINITE_HINT)
        if kind == self.name:  # re-registers the packed-layer dispatch GPTQ-LoRA was trained with
            return load_lora(model, str(folder))
        PeftModel = import_peft(what="a PEFT adapter").PeftModel
        return PeftModel.from_pretrained(model, str(folder))

    # ---- export -----------------------------------------------------------------------------

    def card_title(self, kind: str) -> str:
        return kind.upper()

    def card_lines(self, kind: str, cfg: Mapping[str, Any]) -> list[str]:
        targets = cfg.get("target_modules")
        if isinstance(targets, list | tuple):
            targets = ", ".join(map(str, targets)) or "none"
        return [
            f"- a PEFT {kind.upper()} adapter (qdiablo loads it with `peft.PeftModel`), "
            f"r = {cfg.get('r')}, alpha = {cfg.get('lora_alpha')}",
            f"- target modules: {'not recorded' if targets is None else targets}",
            "- it has no base fingerprint: nothing checks that it was trained on this base",
        ]

    # ---- the memory planner -----------------------------------------------------------------

    def plan_state_bytes(self, shapes, num_blocks: int, rank: int, ranks: int) -> float:
        from qdiablo.memory.state import lora_state_bytes

        return lora_state_bytes(list(shapes), rank, ranks)

    def activation_bytes_per_layer(self, per_block, inputs, dropout, rank, compute_bytes) -> int:
        """Per adapted layer: its dropped, cast input (and the dropout mask) and A's output."""
        c = compute_bytes
        total = sum(a.in_features * (c + (1 if dropout > 0 else 0)) for a in per_block)
        return total + len(per_block) * rank * c
