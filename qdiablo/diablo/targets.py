"""Default target modules per architecture, as PEFT keeps a mapping for LoRA.

DiaBlo's reference adapts the attention's q, k, v and the MLP's up and down projections. Layer
names differ between architectures, and some fuse several projections into one layer (Phi-3's
`qkv_proj` and `gate_up_proj`, GPT-NeoX's and Falcon's `query_key_value`), so the default is
looked up by `model.config.model_type` when the user does not pass `target_modules`. See
docs/architecture.md ("A new architecture") for how to add one. `find_targets` then resolves a
config's targets (names, a regex, or "all-linear"; exclusions; layer indices) to module paths.
"""

from __future__ import annotations

import re

from torch import nn

from qdiablo.diablo.config import DiaBloConfig
from qdiablo.diablo.layer import DiaBloLinear
from qdiablo.errors import UserError

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
OPT_TARGETS = ("q_proj", "k_proj", "v_proj", "fc1", "fc2")
PHI3_TARGETS = ("qkv_proj", "gate_up_proj", "down_proj")
NEOX_TARGETS = ("query_key_value", "dense_h_to_4h", "dense_4h_to_h")

DEFAULT_TARGETS_BY_MODEL_TYPE: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "granite",
            "stablelm",
            "smollm3",
        ),
        LLAMA_TARGETS,
    ),
    "opt": OPT_TARGETS,
    "phi": OPT_TARGETS,
    "phi3": PHI3_TARGETS,
    "gpt_neox": NEOX_TARGETS,
    "falcon": NEOX_TARGETS,
}


def model_type_of(model: nn.Module) -> str | None:
    """`model.config.model_type`, or None for a module without a Hugging Face config."""
    return getattr(getattr(model, "config", None), "model_type", None)


def default_target_modules(model: nn.Module) -> list[str]:
    """The default target layer names for this model's architecture; an error naming the
    architecture, and what to pass instead, when it has no default."""
    model_type = model_type_of(model)
    targets = DEFAULT_TARGETS_BY_MODEL_TYPE.get(model_type or "")
    if targets is None:
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if is_linear_like(m)}
        )
        what = f"architecture '{model_type}'" if model_type else type(model).__name__
        raise UserError(
            f"no default target modules for {what} ({type(model).__name__})",
            hint="pass the layers to adapt: target_modules=[...] in DiaBloConfig, or "
            "--target-modules NAME ... on the command line; this model's linear layers are "
            f"named {', '.join(linear[:12]) or '(none)'}",
        )
    return list(targets)


def resolve_target_modules(model: nn.Module, target_modules: list[str] | str | None):
    """The user's targets as given, or the architecture's default when None."""
    return default_target_modules(model) if target_modules is None else target_modules


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?:\.|$)")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int
    )


def _matches(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def find_targets(model: nn.Module, config: DiaBloConfig) -> list[str]:
    """Module paths to wrap, in model order (None targets: the architecture's default).
    Errors name the offending module."""
    spec = resolve_target_modules(model, config.target_modules)
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = []
    for name, module in model.named_modules():
        if not name or ".base_layer" in name:
            continue
        if spec == "all-linear":
            hit = is_linear_like(module) and module is not output_head
        else:
            hit = _matches(name, spec)
        if not hit or (config.exclude_modules and _matches(name, config.exclude_modules)):
            continue
        if config.layers_to_transform is not None:
            m = _LAYER_INDEX.search(name)
            if m is None or int(m.group(1)) not in config.layers_to_transform:
                continue
        if isinstance(module, DiaBloLinear):
            raise UserError(f"layer '{name}' already has a DiaBlo adapter")
        if not is_linear_like(module):
            raise UserError(
                f"target '{name}' is a {type(module).__name__}, not a linear layer: DiaBlo wraps "
                "layers with in_features/out_features (nn.Linear, QuantLinear, Linear4bit)",
                hint="GPT-2-style Conv1D layers are not supported; target other layers",
            )
        targets.append(name)
    if not targets:
        examples = [n for n, m in model.named_modules() if is_linear_like(m)][:6]
        raise UserError(
            f"no layer matches target_modules={spec!r}",
            hint=f"linear layers in this model look like: {', '.join(examples)}",
        )
    return targets
