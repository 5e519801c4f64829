"""Coordinate descent as a post-step: re-pick the codes against the original weights
(quantizers/cd.py)."""

from __future__ import annotations

from typing import Any

from quantizers.registry import QuantStep, register_step


def run(W: Any, result: Any, H: Any, config: Any) -> Any:
    """`cd_sweeps` sweeps of coordinate descent on the method's result."""
    from quantizers.cd import cd_refine

    return cd_refine(W, result, H, config.cd_sweeps, config.cd_damp)


STEP = register_step(
    QuantStep(name="coordinate descent", stage="post", enabled=lambda c: c.cd_sweeps > 0, run=run)
)
