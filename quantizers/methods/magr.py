"""MagR as a pre-step: shrink each row's largest weights against H before the method runs
(quantizers/magr.py, docs/magr.md)."""

from __future__ import annotations

from typing import Any

from quantizers.registry import QuantStep, register_step


def run(W: Any, H: Any, config: Any) -> Any:
    """The magnitude-reduced weights the method then quantizes."""
    from quantizers.magr import fast_matmul_dtype, magr

    return magr(
        W,
        H,
        alpha=config.resolved_magr_alpha,
        iters=config.magr_iters,
        group_size=config.group_size,
        accelerate=config.magr_solver == "fista",
        matmul_dtype=fast_matmul_dtype(W.device),
    )


STEP = register_step(QuantStep(name="magr", stage="pre", enabled=lambda c: c.magr, run=run))
