"""What DiaBlo and LoRA share: the layers an adapter wraps (one targeting rule for both, so a
matched-budget comparison adapts the same layers) and the trainable-parameter count."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qdiablo.adapters.budget import Shape
from qdiablo.diablo import DiaBloConfig
from qdiablo.diablo.targets import find_targets


@dataclass(frozen=True)
class AdaptedLayer:
    name: str
    in_features: int
    out_features: int
    base_type: str


def adapted_layers(model: nn.Module, target_modules: list[str] | str) -> list[AdaptedLayer]:
    """The layers an adapter with these targets wraps (the same rule for DiaBlo and LoRA)."""
    names = find_targets(model, DiaBloConfig(num_blocks=1, target_modules=target_modules))
    layers = []
    for name in names:
        m = model.get_submodule(name)
        layers.append(AdaptedLayer(name, m.in_features, m.out_features, type(m).__name__))
    return layers


def layer_shapes(layers: list[AdaptedLayer]) -> list[Shape]:
    return [(layer.in_features, layer.out_features) for layer in layers]


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
