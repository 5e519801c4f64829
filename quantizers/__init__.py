"""Calibration, MagR, RTN, GPTQ, packing, the packed QuantLinear, and the GPTQ checkpoint layout.

    from quantizers import QuantConfig, quantize_model, save_quantized, load_quantized
    model = quantize_model(model, calib_batches, QuantConfig(bits=3, group_size=64, magr=True))
    save_quantized(model, "out/w3", tokenizer)

This package imports from neither `qdiablo` nor `eval` (docs/architecture.md, "Layers"). Its
names are imported lazily, so that `quantizers.config` (the flags of `qdiablo quantize`) loads
without torch. Importing the package registers the built-in quantizers (`quantizers.methods`,
declarations only: each loads its algorithm when it first runs).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from quantizers import methods  # noqa: F401  (registers RTN, GPTQ, MagR, CD, reconstruction)

if TYPE_CHECKING:
    from quantizers import kernels
    from quantizers.calibration import tokenize_calibration
    from quantizers.checkpoint import CheckpointError, load_quantized, save_quantized
    from quantizers.config import QuantConfig, default_beta
    from quantizers.quant_linear import QuantLinear, dequantize_cache, dequantize_packed
    from quantizers.quantize import quantize_model
    from quantizers.report import LayerReport, QuantReport
    from quantizers.weights import quantize_weights

# public name -> the module that defines it
_EXPORTS = {
    "kernels": "quantizers.kernels",
    "tokenize_calibration": "quantizers.calibration",
    "CheckpointError": "quantizers.checkpoint",
    "load_quantized": "quantizers.checkpoint",
    "save_quantized": "quantizers.checkpoint",
    "QuantConfig": "quantizers.config",
    "default_beta": "quantizers.config",
    "QuantLinear": "quantizers.quant_linear",
    "dequantize_cache": "quantizers.quant_linear",
    "dequantize_packed": "quantizers.quant_linear",
    "LayerReport": "quantizers.report",
    "QuantReport": "quantizers.report",
    "quantize_model": "quantizers.quantize",
    "quantize_weights": "quantizers.weights",
}

__all__ = [
    "CheckpointError",
    "LayerReport",
    "QuantConfig",
    "QuantLinear",
    "QuantReport",
    "default_beta",
    "dequantize_cache",
    "dequantize_packed",
    "kernels",
    "load_quantized",
    "quantize_model",
    "quantize_weights",
    "save_quantized",
    "tokenize_calibration",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'quantizers' has no attribute {name!r}")
    if name == "kernels":
        return importlib.import_module(module)
    return getattr(importlib.import_module(module), name)
