"""What DiaBlo and LoRA share: the layers an adapter wraps (one targeting rule for both, so a
matched-budget comparison adapts the same layers) and the trainable-parameter count."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
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


def trainable_named(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, p in model.named_parameters():
        if p.requires_grad:
            yield name, p


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is an FSDP2 shard (a DTensor)."""
    return hasattr(t, "full_tensor") and hasattr(t, "placements")


def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into a parameter that may be an FSDP shard (each rank slices its own
    part of the full tensor: no communication)."""
    with torch.no_grad():
        if is_dtensor(param):
            from torch.distributed.tensor import distribute_tensor

            full = full.to(device=param.device, dtype=param.dtype)
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)
