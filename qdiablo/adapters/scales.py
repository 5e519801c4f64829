"""Trained scales beside an adapter (`qdiablo train --train-scales`).

The packed base's per-group scales train with the adapter as float32 multipliers on the stored
fp16 scales (`quantizers.trained_scales`: codes and zero points stay frozen). They are saved in
the adapter folder as `trained_scales.safetensors`, one tensor per packed layer (named as in the
bare model, one number per group), with the digest of the stored scales they multiply in the
file's metadata: loading them onto another base is refused. Being a `.safetensors` file of the
adapter folder, they are part of the adapter's digest (`qdiablo.hashing.adapter_digest`), which
evaluations and exports record.

Loading an adapter for inference folds them into the base (`fold=True`): the stored scales
become the trained ones, exactly what training computed with, so evaluation, merging and export
need no special path. `qdiablo export` writes that folded base.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from torch import nn

from qdiablo.errors import UserError
from quantizers.trained_scales import (
    add_multipliers,
    fold_multipliers,
    load_multipliers,
    multipliers,
    packed_layers,
)

SCALES_FILE = "trained_scales.safetensors"
FORMAT = "qdiablo-trained-scales-1"


def bare_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a DiaBloModel or a PEFT model (or the model itself)."""
    inner = getattr(model, "get_base_model", None)
    return inner() if callable(inner) else model


def stored_scales_digest(model: nn.Module) -> str:
    """sha256 over every packed layer's name and stored fp16 scales: the base a set of trained
    scales multiplies."""
    h = hashlib.sha256()
    for name, layer in sorted(packed_layers(bare_model(model)).items()):
        h.update(name.encode())
        h.update(layer.packed_tensors().scales.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def enable_scale_training(model: nn.Module) -> int:
    """Trainable multipliers (ones) on every packed layer; returns how many numbers train."""
    base = bare_model(model)
    if not packed_layers(base):
        raise UserError(
            "--train-scales needs a packed base (--base gptq or rtn): this one has no packed layers"
        )
    add_multipliers(base, requires_grad=True)
    return sum(t.numel() for t in multipliers(base).values())


def has_trained_scales(folder: str | Path) -> bool:
    return (Path(folder) / SCALES_FILE).is_file()


def save_trained_scales(model: nn.Module, folder: str | Path) -> bool:
    """Write the model's multipliers into `folder` (nothing, and False, when it has none)."""
    from safetensors.torch import save_file

    tensors = multipliers(bare_model(model))
    if not tensors:
        return False
    meta = {"format": FORMAT, "stored_scales_sha256": stored_scales_digest(model)}
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, Path(folder) / SCALES_FILE,
              metadata=meta)  # fmt: skip
    return True


def load_trained_scales(model: nn.Module, folder: str | Path, fold: bool) -> bool:
    """Read `folder`'s trained scales onto the model's packed layers (False when it has none):
    as multipliers (to train on), or folded into the stored scales (`fold`, for inference)."""
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / SCALES_FILE
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: unreadable or truncated safetensors file: {e}") from e
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a qdiablo trained-scales file ({meta.get('format')!r})")
    expected, actual = meta.get("stored_scales_sha256"), stored_scales_digest(model)
    if expected != actual:
        raise UserError(
            f"{path}: these trained scales multiply another base's scales "
            f"({str(expected)[:12]} ≠ {actual[:12]})",
            hint="load the adapter onto the base it was trained on",
        )
    base = bare_model(model)
    try:
        load_multipliers(base, tensors, str(path))
    except ValueError as e:
        raise UserError(str(e)) from e
    if fold:
        fold_multipliers(base)
    return True
