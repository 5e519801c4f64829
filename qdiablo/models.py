"""The one way to load a model: `load_base(source, kind)` for train, eval, export and run.

Every loader starts at `qdiablo.sources.resolve_model`, the single place that turns what the user
gave (a hub id, a local folder, a folder plus a GGUF file, or `smollm2`) into what
`from_pretrained` reads.

The base kinds (one vocabulary; the CLI flags map onto it):

- `auto`: look at the folder: a `qdiablo export` folder loads as base/ + adapter/, a
  `qdiablo quantize` folder (quantize_config.json) as packed `QuantLinear` layers, anything else
  in full precision (`qdiablo eval --quant none`);
- `fp`: full precision, in `dtype` (`qdiablo train --base fp`);
- `gptq` / `rtn`: a `qdiablo quantize` folder written by that method, its linear layers packed;
- `nf4`: bitsandbytes NF4 + double quantization on load (QLoRA's base); a GGUF model (which
  transformers cannot combine with bitsandbytes) is loaded in float and its linear layers are
  swapped in place (`qdiablo.nf4`);
- `nf2`: NF2 fake-quantized (absmax per block of 64), see `qdiablo.nf`.

`dtype` casts the float parameters (embeddings, norms, head); packed layers keep their int32
codes and fp16 scales. The output head and the embeddings always stay in float.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from qdiablo.adapters.loading import load_adapter
from qdiablo.errors import UserError
from qdiablo.health import model_tensors, require_finite
from qdiablo.inputs import MODEL_VERBS, require_finished
from qdiablo.kinds import BASE_KINDS, PACKED_KINDS
from qdiablo.manifest import is_export_folder, verify_export
from qdiablo.nf import fake_quantize_model_nf
from qdiablo.nf4 import bnb_nf4_config, quantize_bnb_4bit_, require_bitsandbytes
from qdiablo.sources import SMOLLM2, parse_dtype, resolve_model
from quantizers.checkpoint import CheckpointError, load_quantized, quantized_skeleton
from quantizers.quant_linear import QuantLinear

log = logging.getLogger(__name__)


def load_tokenizer(name_or_path: str, gguf_file: str | None = None):
    """Load a tokenizer and give it a pad token (EOS) if it has none."""
    from transformers import AutoTokenizer  # deferred: seconds to import, off the --help path

    path, gguf = resolve_model(name_or_path, gguf_file)
    require_finished(path, MODEL_VERBS)  # before a confusing "no tokenizer" from a killed save
    if is_export_folder(path):  # a `qdiablo export` folder: the tokenizer lives in base/
        path = str(Path(path) / "base")
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:  # a missing folder, or one transformers cannot read
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
    from transformers import AutoModelForCausalLM  # deferred: seconds to import

    path, gguf = resolve_model(name_or_path, gguf_file)
    if gguf:
        kwargs["gguf_file"] = gguf
        log.info("loading %s from GGUF %s (Q4_1 weights dequantized to float)", path, gguf)
    else:
        log.info("loading %s", path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype), **kwargs)
    except (OSError, ValueError) as e:  # a missing folder, or one transformers cannot read
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
# Bases: one loader, one vocabulary
# --------------------------------------------------------------------------------------------

QUANTIZE_CONFIG = "quantize_config.json"


def is_quantized_folder(path: str | Path) -> bool:
    """A folder written by qdiablo's quantizers (GPTQ or RTN): it holds quantize_config.json."""
    return Path(path).is_dir() and (Path(path) / QUANTIZE_CONFIG).is_file()


def load_base(
    source: str,
    kind: str = "auto",
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    packed_storage: str | torch.dtype = "int32",
) -> nn.Module:
    """Load the base model that an adapter runs on (see the module docstring for `kind`).

    `packed_storage`: the dtype a packed base's QuantLinear layers hold their bytes in."""
    if kind not in BASE_KINDS:
        raise UserError(f"unknown base '{kind}'", hint=f"choose from {', '.join(BASE_KINDS)}")
    path, _ = resolve_model(source, gguf_file)  # the one entry point: every source resolves here
    require_finished(path, MODEL_VERBS)
    torch_dtype, device = parse_dtype(dtype), torch.device(device)
    local = source != SMOLLM2
    if local and is_export_folder(path):
        if kind != "auto":
            raise UserError(
                f"{source} is an export folder (base/ + adapter/); it cannot be loaded as '{kind}'",
                hint="load it as it is (eval --quant none)",
            )
        log.info("loading the export %s (base/ + adapter/)", source)
        return load_exported(path, device=device, dtype=torch_dtype)
    if kind in PACKED_KINDS or (kind == "auto" and local and is_quantized_folder(path)):
        storage = (
            getattr(torch, packed_storage) if isinstance(packed_storage, str) else packed_storage
        )
        return load_packed(path, None if kind == "auto" else kind, torch_dtype, device, storage)
    if local and is_quantized_folder(path):
        raise UserError(
            f"{source} is already quantized ({QUANTIZE_CONFIG}); it cannot be loaded as '{kind}'",
            hint=f"use --base {'/'.join(PACKED_KINDS)} (train) or --quant none (eval), "
            "or a full-precision model",
        )
    if kind == "nf4":
        return _finite(load_nf4(source, gguf_file, torch_dtype, device), source)
    model = _finite(load_model(source, gguf_file, dtype=torch_dtype, device=device), source)
    if kind == "nf2":
        fake_quantize_model_nf(model, bits=2)
    return model


def _finite(model: nn.Module, source: str | Path) -> nn.Module:
    """Refuse a base holding NaN or inf, naming the tensor (an adapter trained or evaluated on
    it would be NaN too); a model on the meta device has nothing to check."""
    require_finite(
        model_tensors(model),
        f"base {source}",
        hint="the model's weights are damaged (NaN/inf): re-download or re-create it",
    )
    return model


def load_nf4(
    source: str, gguf_file: str | None, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """bitsandbytes NF4 + double quantization: on load, or (GGUF) swapped in after a float load."""
    require_bitsandbytes()
    path, gguf = resolve_model(source, gguf_file)
    config = bnb_nf4_config(dtype)
    if gguf is None:
        from transformers import AutoModelForCausalLM  # deferred: seconds to import

        log.info("loading %s with bitsandbytes NF4 (double quantization)", path)
        try:
            return AutoModelForCausalLM.from_pretrained(
                path, quantization_config=config, device_map={"": device}, dtype=dtype
            )
        except (OSError, ValueError) as e:  # a missing folder, or one transformers cannot read
            raise UserError(f"could not load a model from '{source}': {e}") from e
    net = load_model(source, gguf_file, dtype=dtype, device=device)
    quantize_bnb_4bit_(net, config)
    return net


def load_packed(
    folder: str | Path,
    method: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    storage_dtype: torch.dtype = torch.int32,
) -> nn.Module:
    """A `qdiablo quantize` folder with its linear layers packed (int32 codes, fp16 scales).

    `method` (a registered quantizer: 'gptq', 'rtn', ...), when given, must be the one the
    folder was written with. `dtype` casts only the float parameters (embeddings, norms, head),
    as `from_pretrained(dtype=...)` leaves the buffers: `model.to(dtype)` would also round
    rotary tables and packed biases. The packed bytes are never cast: they are held as
    `storage_dtype` (see QuantLinear). On the meta device nothing is read but the headers
    (FSDP's sharded loading fills it later).
    """
    what = f"--base {method}" if method else "a quantized base"
    require_finished(folder, MODEL_VERBS)
    if not Path(folder).is_dir() or not is_quantized_folder(folder):
        raise UserError(
            f"{what} needs a folder written by `qdiablo quantize`, not '{folder}'",
            hint="quantize first: qdiablo quantize --model ... --output FOLDER",
        )
    try:
        if torch.device(device).type == "meta":
            net = packed_base_on_meta(str(folder), dtype or torch.float32, storage_dtype)
        else:
            net = load_quantized(folder, device=device, storage_dtype=storage_dtype)
    except CheckpointError as e:
        raise UserError(str(e)) from e
    stored = getattr(getattr(net, "quant_config", None), "method", None)
    if method is not None and stored is not None and stored != method:
        raise UserError(
            f"--base {method}: {folder} was quantized with {stored}", hint=f"use --base {stored}"
        )
    if dtype is not None:
        packed = {
            id(p) for m in net.modules() if isinstance(m, QuantLinear) for p in m.parameters()
        }
        for param in net.parameters():
            if param.is_floating_point() and param.dtype != dtype and id(param) not in packed:
                param.data = param.data.to(dtype)
    packed = sum(isinstance(m, QuantLinear) for m in net.modules())
    log.info("loaded %s: %d packed layers (%s)", folder, packed, stored or "gptq layout")
    return net if torch.device(device).type == "meta" else _finite(net, folder)


def packed_base_on_meta(folder: str, dtype: torch.dtype, storage_dtype: torch.dtype) -> nn.Module:
    """The packed model of `folder` on the meta device, float parameters typed as `dtype`."""
    model, files = quantized_skeleton(folder, storage_dtype, packed_device="meta")
    packed = {id(p) for m in model.modules() if isinstance(m, QuantLinear) for p in m.parameters()}
    for p in model.parameters():
        if p.is_floating_point() and id(p) not in packed:
            p.data = p.data.to(dtype)
    model._qdiablo_files = files  # where each tensor lives, for shard_and_load
    model.eval()
    return model


def load_exported(
    path: str | Path,
    *,
    merged: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = True,
):
    """Load a `qdiablo export` folder: base/ + adapter/ (a DiaBloModel or PeftModel), or merged/
    (a plain transformers model). The manifest is checked first (`verify=False` skips the hashes
    only).

    dtype: for base/, the float parameters (as `load_packed`); for merged/, the weights' dtype.
    Default: as stored.
    """
    folder = Path(path)
    require_finished(folder, ("export",))
    verify_export(folder, hashes=verify)
    if merged:
        if not (folder / "merged").is_dir():
            raise UserError(
                f"{folder} has no merged/ model", hint="re-run `qdiablo export` with --merged"
            )
        from transformers import AutoModelForCausalLM  # deferred: seconds to import

        model = AutoModelForCausalLM.from_pretrained(folder / "merged", dtype=dtype or "auto")
        return _finite(model.to(device).eval(), folder / "merged")
    base = load_packed(folder / "base", dtype=dtype, device=device)
    return load_adapter(base, folder / "adapter")
