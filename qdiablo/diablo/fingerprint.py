"""The base fingerprint: catches an adapter loaded onto a different base (e.g. 2-bit vs 4-bit).

A hash of the base's config (with its quantization settings) and of a sample of the weights of
each layer the adapter wraps. Beside the overall `sha256` (what is compared), the fingerprint
keeps the config's hash and each layer's, so that a mismatch says what really differs: the
config, the weights of a named layer, or the set of adapted layers (an edited `target_modules`
on the same base).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
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


def base_fingerprint(model: nn.Module, targets: list[str], state_of: Any = None) -> dict[str, Any]:
    """A hash of the base's config, its quantization settings, and a sample of the weights of
    the layers the adapter wraps; plus a short readable description for error messages, and the
    config's and each layer's own hash (to explain a mismatch).

    `state_of(name, layer)`: the layer's state dict (default `layer.state_dict()`), e.g. read
    from the checkpoint files for a model whose weights are still on the meta device."""
    identity = _config_identity(model)
    config_blob = json.dumps(identity, sort_keys=True, default=str).encode()
    h = hashlib.sha256(config_blob)
    modules = dict(model.named_modules())
    layers = {}
    for name in targets:
        base = modules[name]
        base = base.base_layer if isinstance(base, DiaBloLinear) else base
        h.update(name.encode())
        own = hashlib.sha256(name.encode())
        state = base.state_dict() if state_of is None else state_of(name, base)
        for key, tensor in sorted(state.items()):
            if hasattr(tensor, "shape") and tensor.numel():
                for digest in (h, own):
                    digest.update(f"{key}{tuple(tensor.shape)}".encode())
                if not getattr(tensor, "is_meta", False):  # a model on `meta` has no data
                    sample = _weight_sample(tensor)
                    h.update(sample)
                    own.update(sample)
        layers[name] = own.hexdigest()[:16]
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
    return {
        "sha256": h.hexdigest(),
        "description": desc,
        "config_sha256": hashlib.sha256(config_blob).hexdigest()[:16],
        "layers": layers,
    }


def _names(names: list[str], count: int = 3) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def mismatch_message(adapter: Any, saved: Mapping[str, Any], actual: Mapping[str, Any]) -> str:
    """The error for an adapter whose saved fingerprint is not this base's: a different base,
    or (same config, other layers) a changed target_modules, saying what differs."""
    differs = what_differs(saved, actual)
    if differs.startswith("the adapter's target_modules"):
        return f"adapter {adapter} does not fit its own training: {differs}"
    return f"adapter {adapter} was trained on a different base: {differs}"


def what_differs(saved: Mapping[str, Any], actual: Mapping[str, Any]) -> str:
    """What differs between a saved fingerprint and this base's, in words (the saved one may
    come from an older qdiablo, which kept only sha256 and the description)."""
    layers, now = saved.get("layers"), actual.get("layers") or {}
    if isinstance(layers, dict) and set(layers) != set(now):
        gone, new = sorted(set(layers) - set(now)), sorted(set(now) - set(layers))
        same_config = saved.get("config_sha256") == actual.get("config_sha256")
        parts = []
        if gone:
            parts.append(f"{len(gone)} trained layer(s) not selected here ({_names(gone)})")
        if new:
            parts.append(f"{len(new)} layer(s) selected here but never trained ({_names(new)})")
        what = (
            "the adapter's target_modules select other layers than it was trained on"
            if same_config
            else "the base's architecture differs"
        )
        return f"{what}: {'; '.join(parts)}"
    if saved.get("config_sha256") and saved.get("config_sha256") != actual.get("config_sha256"):
        return (
            f"the base's config differs: the adapter expects ({saved.get('description')}), "
            f"this base is ({actual.get('description')})"
        )
    if isinstance(layers, dict):
        changed = sorted(n for n in layers if layers[n] != now.get(n))
        if changed:
            return (
                f"the base's weights differ in {len(changed)} adapted layer(s) "
                f"({_names(changed)}): same architecture, other weights (another quantization "
                "or fine-tune of it?)"
            )
    return (
        f"it expects ({saved.get('description')}), this base is ({actual.get('description')}); "
        f"fingerprints {str(saved.get('sha256'))[:12]} ≠ {str(actual.get('sha256'))[:12]}"
    )
