"""Trainable per-group scale multipliers on packed layers (EfficientQAT's E2E-QP, PEQA).

A QuantLinear with a multiplier m (float32, [groups, out], started at 1) computes with the scales

    s = fp16(clamp(s₀ · m, MIN_SCALE))        s₀: the stored fp16 scales

while its codes and zero points stay frozen. The forward is the packed layer's own matmul with s
in place of s₀, so a layer whose stored scales are later replaced by s (`fold_multipliers`, what
an export writes) computes bit for bit what the trained layer computed. The gradient passes the
fp16 rounding and the clamp straight through (`_ScaledPackedMatmul` in quant_linear.py):

    ∂L/∂m[g, o] = s₀[g, o] · Σ_{i ∈ g} (q[i, o] − z[g, o]) · (Xᵀ ∂L/∂Y)[i, o]

computed in the backward from the saved input and the packed tensors (no float copy of the weight
is kept between forward and backward). Multipliers never enter a layer's state dict: the base
checkpoint and the adapters' base fingerprints stay those of the stored scales; they are saved
and loaded by name with `multipliers` / `load_multipliers`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from quantizers.quant_linear import QuantLinear, effective_scales

# Path components under which adapter wrappers keep the layer they wrap (DiaBlo, PEFT).
_WRAPPER_PARTS = re.compile(r"\.(base_layer|quant_linear_module)(?=\.|$)")


def packed_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """{name: layer} of every QuantLinear, named as in the bare model: the components adapter
    wrappers add (`base_layer`, PEFT's `quant_linear_module`) are left out of the names."""
    return {
        _WRAPPER_PARTS.sub("", n): m for n, m in model.named_modules() if isinstance(m, QuantLinear)
    }


def add_multipliers(model: nn.Module, requires_grad: bool = True) -> list[str]:
    """Give every QuantLinear of `model` a multiplier of ones (float32, on its device); returns
    the layer names. A layer that has one already keeps it."""
    names = []
    for name, layer in packed_layers(model).items():
        if layer.scale_multiplier is None:
            scales = layer.packed_tensors().scales
            ones = torch.ones(scales.shape, dtype=torch.float32, device=scales.device)
            layer.scale_multiplier = nn.Parameter(ones, requires_grad=requires_grad)
        names.append(name)
    return names


def multipliers(model: nn.Module) -> dict[str, Tensor]:
    """{layer name: multiplier} of every QuantLinear that has one (detached)."""
    return {
        n: m.scale_multiplier.detach()
        for n, m in packed_layers(model).items()
        if m.scale_multiplier is not None
    }


def load_multipliers(model: nn.Module, tensors: Mapping[str, Tensor], source: str = "") -> None:
    """Set the multipliers of `model`'s QuantLinear layers from {layer name: tensor}, adding them
    where missing. Strict: the names must be exactly the packed layers, with their shapes."""
    layers = packed_layers(model)
    missing, extra = sorted(set(layers) - set(tensors)), sorted(set(tensors) - set(layers))
    if missing or extra:
        what = f"{len(missing)} layer(s) missing, e.g. {missing[0]}" if missing else ""
        what += ("; " if what else "") + (f"{len(extra)} unknown, e.g. {extra[0]}" if extra else "")
        raise ValueError(f"{source}: trained scales do not match this base's packed layers: {what}")
    add_multipliers(model, requires_grad=False)
    with torch.no_grad():
        for name, layer in layers.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(layer.scale_multiplier.shape):
                raise ValueError(
                    f"{source}: '{name}' has scales {tuple(t.shape)}, the layer "
                    f"{tuple(layer.scale_multiplier.shape)}"
                )
            layer.scale_multiplier.copy_(t.float())


@torch.no_grad()
def fold_multipliers(model: nn.Module) -> int:
    """Write each layer's effective scales into its stored fp16 scales and drop the multiplier:
    the layer then computes exactly what it computed with it. Returns the layers folded."""
    count = 0
    for layer in packed_layers(model).values():
        if layer.scale_multiplier is None:
            continue
        scales = layer.packed_tensors().scales
        scales.copy_(effective_scales(scales, layer.scale_multiplier))
        layer.scale_multiplier = None
        count += 1
    return count
