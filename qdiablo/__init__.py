"""qdiablo: quantization-aware fine-tuning with DiaBlo diagonal blocks on MagR + GPTQ/RTN bases."""

__version__ = "0.1.0"

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
