"""Atomic writes and user-facing reads: a crash never leaves a half-written file that looks whole.

The atomic helpers live in `quantizers.fileio` (one copy, which `quantizers` uses too); this
module re-exports them and reads files with qdiablo's `UserError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qdiablo.errors import UserError
from quantizers.fileio import atomic_path, write_json, write_text
from quantizers.fileio import read_json as _read_json

__all__ = [
    "atomic_path",
    "check_adapter_tensors",
    "read_adapter_weights",
    "read_json",
    "write_json",
    "write_text",
]


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read a JSON file; a missing or malformed file is a UserError naming it."""
    return _read_json(path, what, error=UserError)


def read_adapter_weights(path: Path) -> dict:
    """An adapter's safetensors weights; a missing or truncated file is a UserError naming it."""
    # safetensors.torch imports torch: deferred so that light importers of qdiablo.io stay light.
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"adapter weights not found: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable or truncated safetensors file: {e}") from e


def check_adapter_tensors(path: Path, expected: dict[str, tuple[int, ...]], found: dict) -> None:
    """The one check of an adapter file's tensors against what the model needs: the same keys
    (`expected`: key → shape) and the same shapes; a UserError naming the file and the first
    missing, unexpected or misshapen tensor."""
    missing = sorted(expected.keys() - found.keys())
    extra = sorted(found.keys() - expected.keys())
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
        if extra:
            parts.append(f"{len(extra)} unexpected tensor(s), e.g. {extra[0]}")
        raise UserError(
            f"{path} does not match this model: " + "; ".join(parts),
            hint="was it trained with other target modules, another adapter or another model?",
        )
    for key, shape in expected.items():
        if tuple(found[key].shape) != tuple(shape):
            raise UserError(
                f"{path}: '{key}' has shape {tuple(found[key].shape)}, the model needs "
                f"{tuple(shape)}"
            )
