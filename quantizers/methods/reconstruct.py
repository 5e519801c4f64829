"""Block-wise reconstruction as a block step: once a decoder block is quantized, train its
codes and scales against the full-precision block's outputs (quantizers/reconstruct.py). The
block loop (quantizers/quantize.py) carries the full-precision inputs it needs."""

from __future__ import annotations

from typing import Any

from quantizers.registry import QuantStep, register_step


def run(
    block: Any, hidden: Any, kwargs: Any, inputs: Any, config: Any, calib_dtype: Any, name: str
) -> Any:
    """The block trained in place; its ReconReport."""
    from quantizers.reconstruct import reconstruct_block

    return reconstruct_block(
        block, hidden, kwargs, inputs.hidden_fp, inputs.heldout, config, calib_dtype, name
    )


STEP = register_step(
    QuantStep(name="reconstruction", stage="block", enabled=lambda c: c.reconstruct, run=run)
)
