"""Calibration, MagR, RTN, GPTQ, packing, the packed QuantLinear, and the GPTQ checkpoint layout.

    from quantizers import QuantConfig, quantize_model, save_quantized, load_quantized
    model = quantize_model(model, calib_batches, QuantConfig(bits=3, group_size=64, magr=True))
    save_quantized(model, "out/w3", tokenizer)

This package imports from neither `qdiablo` nor `eval` (docs/architecture.md, "Layers").
"""

from quantizers import kernels
from quantizers.calibration import tokenize_calibration
from quantizers.checkpoint import CheckpointError, load_quantized, save_quantized
from quantizers.config import QuantConfig, default_beta
from quantizers.quant_linear import QuantLinear, dequantize_cache, dequantize_packed
from quantizers.quantize import LayerReport, QuantReport, quantize_model, quantize_weights

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
