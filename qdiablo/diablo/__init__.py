"""DiaBlo: diagonal-block adapters (config, layer and model, as PEFT lays out a tuner).

The layer and model (torch) are imported lazily, so that `qdiablo.diablo.config` (read by the
CLI's flags) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from qdiablo.diablo.config import DiaBloConfig

if TYPE_CHECKING:
    from qdiablo.diablo.layer import DiaBloLinear, block_diagonal_matmul
    from qdiablo.diablo.model import DiaBloModel, get_diablo_model

__all__ = [
    "DiaBloConfig",
    "DiaBloLinear",
    "DiaBloModel",
    "block_diagonal_matmul",
    "get_diablo_model",
]

_EXPORTS = {
    "DiaBloLinear": "qdiablo.diablo.layer",
    "block_diagonal_matmul": "qdiablo.diablo.layer",
    "DiaBloModel": "qdiablo.diablo.model",
    "get_diablo_model": "qdiablo.diablo.model",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qdiablo.diablo' has no attribute {name!r}")
