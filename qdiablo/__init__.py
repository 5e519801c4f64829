"""qdiablo: quantization-aware fine-tuning with DiaBlo diagonal blocks on MagR + GPTQ/RTN bases.

The DiaBlo names are imported lazily (module `__getattr__`): importing a light module such as
`qdiablo.errors` must not pull in torch and the adapter code (see docs/architecture.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from qdiablo.diablo import (
        DiaBloConfig,
        DiaBloLinear,
        DiaBloModel,
        block_diagonal_matmul,
        get_diablo_model,
    )

__all__ = [
    "DiaBloConfig",
    "DiaBloLinear",
    "DiaBloModel",
    "__version__",
    "block_diagonal_matmul",
    "get_diablo_model",
]

_LAZY = {"DiaBloConfig", "DiaBloLinear", "DiaBloModel", "block_diagonal_matmul", "get_diablo_model"}


def __getattr__(name: str):
    if name in _LAZY:
        from qdiablo import diablo

        return getattr(diablo, name)
    raise AttributeError(f"module 'qdiablo' has no attribute {name!r}")
