"""The base fingerprint an adapter records: a hash of the base's config, its quantization
settings and a sample of the weights of the layers it wraps, so that an adapter trained on one
base (e.g. 2-bit) is not silently loaded onto another (e.g. 4-bit)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from qdiablo.diablo.layer import DiaBloLinear

_VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "dtype",
    "torch_dtype",
    "use_cache",
    "architectures",  # absent after a GGUF load, set after save_pretrained + from_pretrained
}


def _config_identity(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    data = config.to_dict()
    return {
        k: v for k, v in data.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS
    }


def _weight_sample(t: Any, count: int = 256) -> bytes:
    """Evenly spaced elements of a tensor; floats rounded to bf16, so fp32/bf16 copies agree.

    `t` may also be a tensor still in a file (anything with shape, numel() and take(indices)),
    so that only the sampled elements are read."""
    idx = torch.linspace(0, t.numel() - 1, min(count, t.numel())).long()
    if isinstance(t, torch.Tensor):
        flat = t.detach().reshape(-1)
        sample = flat[idx.to(flat.device)].cpu()
    else:
        sample = t.take(idx)
    if sample.is_floating_point():
        sample = sample.to(torch.bfloat16).view(torch.int16)
    return sample.numpy().tobytes()


def base_fingerprint(model: nn.Module, targets: list[str], state_of: Any = None) -> dict[str, str]:
    """A hash of the base's config, its quantization settings, and a sample of the weights of
    the layers the adapter wraps; plus a short readable description for error messages.

    `state_of(name, layer)`: the layer's state dict (default `layer.state_dict()`), e.g. read
    from the checkpoint files for a model whose weights are still on the meta device."""
    identity = _config_identity(model)
    h = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    modules = dict(model.named_modules())
    for name in targets:
        base = modules[name]
        base = base.base_layer if isinstance(base, DiaBloLinear) else base
        h.update(name.encode())
        state = base.state_dict() if state_of is None else state_of(name, base)
        for key, tensor in sorted(state.items()):
            if hasattr(tensor, "shape") and tensor.numel():
                h.update(f"{key}{tuple(tensor.shape)}".encode())
                if not getattr(
                    tensor, "is_meta", False
                ):  # a model built on `meta` (memory plans) has no data
                    h.update(_weight_sample(tensor))
    quant = identity.get("quantization_config") or {}
    desc = f"{identity.get('model_type', type(model).__name__)}"
    if "num_hidden_layers" in identity:
        desc += f", {identity['num_hidden_layers']} layers, hidden {identity.get('hidden_size')}"
    if quant:
        method = quant.get("quant_method", "?")
        bits = quant.get("bits") or ("4" if quant.get("load_in_4bit") else "?")
        desc += f", {method} {bits}-bit"
        if quant.get("group_size") is not None:
            desc += f" g{quant['group_size']}"
    return {"sha256": h.hexdigest(), "description": desc}
