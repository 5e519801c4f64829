"""GPTQ: error-compensating quantization against the input Hessian (quantizers/gptq.py)."""

from __future__ import annotations

from typing import Any

from quantizers.registry import QuantMethod, register_method


def quantize(W: Any, H: Any, config: Any, name: str) -> Any:
    """GPTQ on W given H, with act-order and static groups as the config asks."""
    from quantizers.gptq import gptq_quantize

    return gptq_quantize(
        W,
        H,
        config.bits,
        group_size=config.group_size,
        sym=config.sym,
        beta=config.resolved_beta,
        damp_percent=config.damp_percent,
        desc_act=config.desc_act,
        static_groups=config.static_groups,
        min_zero=config.min_zero,
        name=name,
    )


METHOD = register_method(
    QuantMethod(
        name="gptq",
        help="error-compensating, needs calibration data",
        quantize=quantize,
        needs_calibration=True,
        act_order=True,
    )
)
