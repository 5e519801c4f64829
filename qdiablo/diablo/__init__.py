"""DiaBlo: diagonal-block adapters (config, layer and model, as PEFT lays out a tuner)."""

from qdiablo.diablo.config import DiaBloConfig
from qdiablo.diablo.layer import DiaBloLinear, block_diagonal_matmul
from qdiablo.diablo.model import DiaBloModel, get_diablo_model

__all__ = [
    "DiaBloConfig",
    "DiaBloLinear",
    "DiaBloModel",
    "block_diagonal_matmul",
    "get_diablo_model",
]
