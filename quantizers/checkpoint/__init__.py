"""save_quantized / load_quantized: a Hugging Face folder in the GPTQ checkpoint layout.

    config.json            the model config, with `quantization_config` (quant_method "gptq")
    quantize_config.json   the same quantization settings (GPTQModel reads this file)
    model.safetensors      every tensor; quantized layers as qweight/qzeros/scales/g_idx
    tokenizer files        when a tokenizer is given
    quantization_report.json/.md  the per-layer report of quantize_model, when there is one

Zero points: `checkpoint_format` "gptq_v2" (the default) stores the zero as is; "gptq" (v1)
stores zero − 1 in qzeros. QuantLinear holds v2 in memory; saving and loading convert. Writes are
staged (a temporary folder inside the target, whose files then replace only the same-named
files); loading is strict and names
the file and tensor of anything missing, extra, truncated or mismatched.

Modules: `settings` (file names, the quantization_config entry ↔ QuantConfig), `files` (which
file holds which tensor, headers read without data), `skeleton` (the model built and checked
before loading), `save` and `load`.
"""

from quantizers.checkpoint.files import read_header, weight_files
from quantizers.checkpoint.load import load_quantized
from quantizers.checkpoint.save import save_quantized
from quantizers.checkpoint.settings import (
    CORE_KEYS,
    FORMAT_VERSION,
    INDEX_NAME,
    QUANTIZE_CONFIG_NAME,
    REPORT_MD_NAME,
    REPORT_NAME,
    TOP_LEVEL_KEYS,
    WEIGHTS_NAME,
    CheckpointError,
    config_from_entry,
)
from quantizers.checkpoint.skeleton import quantized_skeleton

__all__ = [
    "CORE_KEYS",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "QUANTIZE_CONFIG_NAME",
    "REPORT_MD_NAME",
    "REPORT_NAME",
    "TOP_LEVEL_KEYS",
    "WEIGHTS_NAME",
    "CheckpointError",
    "config_from_entry",
    "load_quantized",
    "quantized_skeleton",
    "read_header",
    "save_quantized",
    "weight_files",
]
