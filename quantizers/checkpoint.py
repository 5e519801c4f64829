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
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from quantizers.config import QuantConfig
from quantizers.fileio import read_json, staged_dir, write_json
from quantizers.packing import zeros_v1_to_v2, zeros_v2_to_v1
from quantizers.quant_linear import QuantLinear

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
QUANTIZE_CONFIG_NAME = "quantize_config.json"
REPORT_NAME = "quantization_report.json"
REPORT_MD_NAME = "quantization_report.md"
# quantization_config keys that must agree between config.json and quantize_config.json
# quantization_config keys other tools read at the top level, also in meta.qdiablo
TOP_LEVEL_KEYS = ("bits", "group_size", "sym", "desc_act", "checkpoint_format")
# The layout of a folder save_quantized writes: a newer layout says so instead of half-loading.
FORMAT_VERSION = 1
CORE_KEYS = ("bits", "group_size", "sym", "desc_act", "checkpoint_format", "quant_method")


class CheckpointError(ValueError):
    """A quantized checkpoint is missing, malformed, truncated or does not match its config."""


def _quant_config_of(model: nn.Module) -> QuantConfig:
    config = getattr(model, "quant_config", None)
    if isinstance(config, QuantConfig):
        return config
    qc = getattr(model.config, "quantization_config", None)
    if isinstance(qc, dict):
        return _config_from_entry(qc, "model.config.quantization_config")
    raise CheckpointError("the model has no quantization settings: run quantize_model first")


def _unique_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict without tied duplicates (a tied lm_head is stored once, as the
    embedding), every tensor contiguous."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out: dict[str, Tensor] = {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and ident in seen:
            continue
        seen[ident] = key
        out[key] = t.detach().contiguous()
    return out


def save_quantized(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer=None,
    claim: Callable[[list[str]], None] | None = None,
) -> Path:
    """Write `model` (quantized by quantize_model or loaded by load_quantized) as a HF folder.

    Only the files written here are replaced in `directory`; other files stay. `claim` is called
    with their names just before they move into place (the CLI records them as its own)."""
    directory = Path(directory)
    config = _quant_config_of(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise CheckpointError("the model has no QuantLinear layers: run quantize_model first")
    for name, m in layers.items():
        if m.bits != config.bits:
            raise CheckpointError(f"{name}: {m.bits}-bit layer in a {config.bits}-bit model")
    # Not safetensors.torch.save_model: the file holds v1 zero points the model does not, so the
    # state is built here, a tied tensor once under its first name (as save_model would keep it).
    state = _unique_state_dict(model)
    if config.checkpoint_format == "gptq":
        for name, m in layers.items():
            qzeros = m.packed_tensors().qzeros.cpu()
            state[f"{name}.qzeros"] = zeros_v2_to_v1(qzeros, m.bits, m.out_features, name)
    state = {k: v.cpu() for k, v in state.items()}
    entry = config.quantization_config()
    entry.setdefault("meta", {})["qdiablo_format_version"] = FORMAT_VERSION
    with staged_dir(directory, claim) as tmp:
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        previous = getattr(model.config, "quantization_config", None)
        model.config.quantization_config = entry
        try:
            model.config.save_pretrained(tmp)
        finally:
            model.config.quantization_config = previous if previous is not None else entry
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            with contextlib.suppress(Exception):
                generation.save_pretrained(tmp)
        write_json(tmp / QUANTIZE_CONFIG_NAME, entry)
        report = getattr(model, "quantization_report", None)
        if report is not None:
            write_json(tmp / REPORT_NAME, report.to_dict())
            (tmp / REPORT_MD_NAME).write_text(report.to_markdown(), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    log.info(
        "saved %d quantized layers to %s (%s)", len(layers), directory, config.checkpoint_format
    )
    return directory


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    data = read_json(path, what="file", error=CheckpointError)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _config_from_entry(entry: dict[str, Any], where: str) -> QuantConfig:
    """QuantConfig from a quantization_config entry (ours has meta.qdiablo; others do not)."""
    if entry.get("quant_method") != "gptq":
        raise CheckpointError(
            f"{where}: quant_method is {entry.get('quant_method')!r}, expected 'gptq'"
        )
    meta = entry.get("meta") or {}
    ours = meta.get("qdiablo")
    version = meta.get("qdiablo_format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: written by a newer qdiablo (quantized folder format {version!r}); this "
            f"one reads format {FORMAT_VERSION}: upgrade qdiablo to load it"
        )
    if isinstance(ours, dict):
        for key in TOP_LEVEL_KEYS:  # what GPTQModel and transformers read must agree with ours
            if key in entry and key in ours and entry[key] != ours[key]:
                raise CheckpointError(
                    f"{where}: top-level {key}={entry[key]!r} disagrees with qdiablo's "
                    f"meta.qdiablo.{key}={ours[key]!r}"
                )
    try:
        if isinstance(ours, dict):
            fields = {k: v for k, v in ours.items() if not k.startswith("resolved_")}
            return QuantConfig.from_dict(fields)
        return QuantConfig(
            bits=entry.get("bits", 4),
            group_size=entry.get("group_size", 128),
            sym=entry.get("sym", True),
            desc_act=entry.get("desc_act", False),
            static_groups=entry.get("static_groups", False),
            true_sequential=entry.get("true_sequential", True),
            damp_percent=entry.get("damp_percent", 0.01),
            checkpoint_format=entry.get("checkpoint_format", "gptq"),
        )
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e


def _read_header(file: Path) -> dict[str, dict[str, Any]]:
    """Each tensor's shape and safetensors dtype, read by safetensors without loading any data.

    safetensors refuses a file whose tensors do not all lie inside it; the error then names the
    file and, when it was cut short, the first tensor whose bytes are missing."""
    try:
        with safe_open(file, framework="pt") as f:
            names = f.keys()  # a safe_open handle is not iterable
            slices = {name: f.get_slice(name) for name in names}
            return {
                name: {"shape": list(s.get_shape()), "dtype": s.get_dtype()}
                for name, s in slices.items()
            }
    except SafetensorError as e:
        raise CheckpointError(_damage(file, e)) from e


def _damage(file: Path, error: Exception) -> str:
    """What is wrong with a file safetensors refused, read from its raw header."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{file}: truncated: {size} bytes, no safetensors header"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return f"{file}: truncated: the header alone needs {n} bytes"
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{file}: malformed safetensors header ({error})"
    header.pop("__metadata__", None)
    data = size - 8 - n
    cut = sorted(
        (info["data_offsets"][1], name) for name, info in header.items() if isinstance(info, dict)
    )
    for end, name in cut:
        if end > data:
            return (
                f"{file}: tensor '{name}' is truncated: it needs bytes up to {end} of the data "
                f"section, which holds only {data} (the file was cut short)"
            )
    return f"{file}: not a valid safetensors file ({error})"


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _weight_files(directory: Path) -> dict[str, Path]:
    """tensor name -> file, for a single file or a sharded index. Any other weights or index
    file in the folder is refused: a loader must not pick a half of two checkpoints."""
    single = directory / WEIGHTS_NAME
    index = directory / INDEX_NAME
    present = {p.name for p in directory.glob("*.safetensors")} | {
        p.name for p in directory.glob("*.safetensors.index.json")
    }
    if single.is_file():
        files = {"": single}
        expected = {WEIGHTS_NAME}
    elif index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map")
        files = {k: directory / v for k, v in weight_map.items()}
        expected = {INDEX_NAME, *(Path(v).name for v in weight_map.values())}
    else:
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} (or {INDEX_NAME}) found")
    foreign = sorted(present - expected)
    if foreign:
        raise CheckpointError(
            f"{directory}: holds weights files this checkpoint does not list "
            f"({', '.join(foreign)}): refusing to load a mix; move them out of the folder"
        )
    return files


def load_quantized(
    directory: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    storage_dtype: torch.dtype = torch.int32,
) -> nn.Module:
    """Load a folder written by save_quantized (or a GPTQ-layout export) into QuantLinear layers.

    dtype: cast the unquantized weights (embeddings, norms, lm_head, biases); packed tensors and
    fp16 scales stay as stored. Default: as stored.
    storage_dtype: the dtype QuantLinear holds its packed bytes in (see QuantLinear).
    """

    directory = Path(directory)
    model, files = quantized_skeleton(directory, storage_dtype, packed_device="meta")
    config = model.quant_config
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    state: dict[str, Tensor] = {}
    for file in sorted(set(files.values())):
        state.update(load_file(file))
    for name in quantized:
        _check_packed(name, state, files[f"{name}.scales"])
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    left = [k for k, v in model.state_dict().items() if v.is_meta]
    if left:
        raise CheckpointError(f"{directory}: tensors never loaded: {left[:5]}")
    if config.checkpoint_format == "gptq":
        for name in quantized:
            q = model.get_submodule(name)
            qzeros = q.packed_tensors().qzeros
            zeros, wrapped = zeros_v1_to_v2(qzeros, q.bits, q.out_features)
            qzeros.copy_(zeros)
            if wrapped:
                log.warning(
                    "%s: %d v1 zero points are stored as %d (a wrapped zero of 0); read as 0",
                    name,
                    wrapped,
                    2**q.bits - 1,
                )
    if dtype is not None:
        model.to(dtype)
    model.to(device)
    model.eval()
    return model


def quantized_skeleton(
    directory: str | os.PathLike,
    storage_dtype: torch.dtype = torch.int32,
    packed_device: torch.device | str = "meta",
) -> tuple[nn.Module, dict[str, Path]]:
    """The model of a GPTQ-layout folder with its QuantLinear layers in place, every tensor
    checked against the files' headers but none loaded: float weights on `meta`, packed tensors
    on `packed_device` (zeros), non-persistent buffers (rotary tables) real. Returns the model
    (with `quant_config` and `config.quantization_config` set) and the tensor name → file map."""
    # Deferred: transformers and accelerate take seconds to import; only loading needs them.
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a folder")
    cfg_json = _read_json(directory / "config.json")
    entry = cfg_json.get("quantization_config")
    qfile = directory / QUANTIZE_CONFIG_NAME
    if entry is None and qfile.is_file():
        entry = _read_json(qfile)
    if not isinstance(entry, dict):
        raise CheckpointError(f"{directory / 'config.json'}: no quantization_config entry")
    if qfile.is_file():
        other = _read_json(qfile)
        for key in CORE_KEYS:
            if key in other and key in entry and other[key] != entry[key]:
                raise CheckpointError(
                    f"{qfile}: {key}={other[key]!r} disagrees with config.json's "
                    f"quantization_config {key}={entry[key]!r}"
                )
    config = _config_from_entry(entry, str(directory / "config.json"))

    # The files first: every tensor present in full, before any model is built.
    files = _weight_files(directory)
    headers: dict[str, tuple[Path, dict[str, Any]]] = {}
    for file in sorted(set(files.values())):
        if not file.is_file():
            raise CheckpointError(f"{file}: file not found (listed in {INDEX_NAME})")
        for name, info in _read_header(file).items():
            headers[name] = (file, info)

    hf_config = AutoConfig.from_pretrained(directory)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config)
    packed = (".qweight", ".qzeros", ".scales", ".g_idx")
    quantized = sorted({k.rsplit(".", 1)[0] for k in headers if k.endswith(packed)})
    if not quantized:
        raise CheckpointError(f"{directory}: no '*.qweight' tensors: not a GPTQ checkpoint")
    for name in quantized:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"{next(iter(files.values()))}: tensor '{name}.qweight' names no module of "
                f"{type(model).__name__}"
            ) from None
        if not isinstance(lin, nn.Linear):
            raise CheckpointError(f"{name}: expected nn.Linear to hold a quantized layer")
        has_bias = f"{name}.bias" in headers
        bias_dtype = (
            _SAFETENSORS_DTYPES.get(headers[f"{name}.bias"][1]["dtype"]) if has_bias else None
        )
        try:
            q = QuantLinear(
                lin.in_features,
                lin.out_features,
                config.bits,
                config.group_size,
                bias=has_bias,
                bias_dtype=bias_dtype or torch.float32,
                device=packed_device,
                storage_dtype=storage_dtype,
            )
        except ValueError as e:
            raise CheckpointError(f"{name}: {e}") from e
        model.set_submodule(name, q)

    expected = model.state_dict(keep_vars=True)
    tied = _tied_keys(model, set(headers))
    for key in expected:
        if key not in headers and key not in tied:
            raise CheckpointError(
                f"{next(iter(files.values()))}: tensor '{key}' is missing from the checkpoint"
            )
    for key, (file, info) in headers.items():
        if key not in expected:
            raise CheckpointError(
                f"{file}: unexpected tensor '{key}', which {type(model).__name__} with "
                f"bits={config.bits}, group_size={config.group_size} does not have"
            )
        want = expected[key]
        shape = tuple(info["shape"])
        if shape != tuple(want.shape):
            raise CheckpointError(
                f"{file}: tensor '{key}' has shape {list(shape)}, expected {list(want.shape)} "
                f"(bits={config.bits}, group_size={config.group_size})"
            )
        stored = _SAFETENSORS_DTYPES.get(info["dtype"])
        packed_int = key.endswith((".qweight", ".qzeros", ".g_idx"))
        if packed_int and key.rpartition(".")[0] in quantized and stored != torch.int32:
            raise CheckpointError(f"{file}: tensor '{key}' is {info['dtype']}, expected I32")
    model.config.quantization_config = entry
    model.quant_config = config
    return model, {key: file for key, (file, _) in headers.items()}


def _check_packed(name: str, state: dict[str, Tensor], file: Path) -> None:
    """Values a kernel trusts: g_idx indexes scales without bounds checks (on a GPU a crafted
    g_idx reads out of bounds), and a zero or non-finite scale poisons every output. Codes and
    zero points need no check: every b-bit field of the packed words decodes into [0, 2^b)."""
    scales = state[f"{name}.scales"]
    groups = scales.shape[0]
    g_idx = state.get(f"{name}.g_idx")
    if g_idx is not None and g_idx.numel():
        low, high = int(g_idx.min()), int(g_idx.max())
        if low < 0 or high >= groups:
            raise CheckpointError(
                f"{file}: tensor '{name}.g_idx' holds values {low}..{high}, outside [0, {groups}) "
                f"(the layer has {groups} groups)"
            )
    bad = ~torch.isfinite(scales.float()) | (scales == 0)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise CheckpointError(
            f"{file}: tensor '{name}.scales' holds {int(bad.sum())} zero or non-finite "
            f"value(s), the first at {where}"
        )


def _tied_keys(model: nn.Module, present: set[str]) -> set[str]:
    """Keys that may be absent from the file because they are tied to a key that is present
    (e.g. lm_head.weight to model.embed_tokens.weight)."""
    pairs = dict(getattr(model, "all_tied_weights_keys", None) or {})
    tied = set()
    for target, source in pairs.items():
        if source in present:
            tied.add(target)
        if target in present:
            tied.add(source)
    seen: dict[int, str] = {}
    for key, p in model.state_dict(keep_vars=True).items():  # parameters shared in memory
        if id(p) in seen and seen[id(p)] in present:
            tied.add(key)
        seen.setdefault(id(p), key)
    return tied
