"""DiaBlo on a frozen base, as training attaches it (the adapter itself: qdiablo.diablo)."""

from __future__ import annotations

from torch import nn

from qdiablo.diablo import DiaBloConfig, DiaBloModel, get_diablo_model


def attach_diablo(
    model: nn.Module, num_blocks: int, target_modules: list[str] | str, dropout: float
) -> DiaBloModel:
    """Freeze the base and wrap the targets with zero-initialised float32 blocks."""
    config = DiaBloConfig(
        num_blocks=num_blocks,
        target_modules=target_modules,
        dropout=dropout,
        block_dtype="float32",
    )
    return get_diablo_model(model, config)
