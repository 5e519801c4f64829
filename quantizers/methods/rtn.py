"""RTN: round to nearest on the min-max grid (quantizers/rtn.py); needs no calibration data."""

from __future__ import annotations

from typing import Any

from quantizers.registry import QuantMethod, register_method


def quantize(W: Any, H: Any, config: Any, name: str) -> Any:
    """Round W to its grid (H, when given, only serves the caller's error report)."""
    from quantizers.rtn import rtn_quantize

    del H, name
    return rtn_quantize(
        W, config.bits, config.group_size, config.sym, config.resolved_beta, config.min_zero
    )


METHOD = register_method(QuantMethod(name="rtn", help="round to nearest", quantize=quantize))
