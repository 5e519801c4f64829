"""The quantization settings of a GPTQ-layout folder: the file names, the format version, and
the `quantization_config` entry read back into a QuantConfig (ours under `meta.qdiablo`, or the
top-level keys another tool wrote)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from quantizers.config import QuantConfig
from quantizers.fileio import read_json

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
QUANTIZE_CONFIG_NAME = "quantize_config.json"
REPORT_NAME = "quantization_report.json"
REPORT_MD_NAME = "quantization_report.md"
# quantization_config keys other tools read at the top level, also in meta.qdiablo
TOP_LEVEL_KEYS = ("bits", "group_size", "sym", "desc_act", "checkpoint_format")
# The layout of a folder save_quantized writes: a newer layout says so instead of half-loading.
FORMAT_VERSION = 1
# quantization_config keys that must agree between config.json and quantize_config.json
CORE_KEYS = ("bits", "group_size", "sym", "desc_act", "checkpoint_format", "quant_method")


class CheckpointError(ValueError):
    """A quantized checkpoint is missing, malformed, truncated or does not match its config."""


def read_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object."""
    data = read_json(path, what="file", error=CheckpointError)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def quant_config_of(model: nn.Module) -> QuantConfig:
    """The settings a quantized model in memory was made with."""
    config = getattr(model, "quant_config", None)
    if isinstance(config, QuantConfig):
        return config
    qc = getattr(model.config, "quantization_config", None)
    if isinstance(qc, dict):
        return config_from_entry(qc, "model.config.quantization_config")
    raise CheckpointError("the model has no quantization settings: run quantize_model first")


def read_entry(directory: Path) -> tuple[dict[str, Any], QuantConfig]:
    """config.json's `quantization_config` (or quantize_config.json's when config.json has
    none), checked against quantize_config.json, and the QuantConfig it stands for."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a folder")
    cfg_json = read_object(directory / "config.json")
    entry = cfg_json.get("quantization_config")
    qfile = directory / QUANTIZE_CONFIG_NAME
    if entry is None and qfile.is_file():
        entry = read_object(qfile)
    if not isinstance(entry, dict):
        raise CheckpointError(f"{directory / 'config.json'}: no quantization_config entry")
    if qfile.is_file():
        other = read_object(qfile)
        for key in CORE_KEYS:
            if key in other and key in entry and other[key] != entry[key]:
                raise CheckpointError(
                    f"{qfile}: {key}={other[key]!r} disagrees with config.json's "
                    f"quantization_config {key}={entry[key]!r}"
                )
    return entry, config_from_entry(entry, str(directory / "config.json"))


def config_from_entry(entry: dict[str, Any], where: str) -> QuantConfig:
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
