"""DiaBloModel: wraps a causal LM, swaps target layers for DiaBloLinear, saves and loads adapters.

On disk an adapter is a PEFT-like folder (docs/formats.md §5):
- `adapter_config.json`: `method: "diablo"`, the DiaBloConfig fields, the base's name and
  fingerprint, and `format_version`;
- `adapter_model.safetensors`: one tensor per adapted layer, keyed `<module path>.blocks`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from qdiablo import __version__
from qdiablo.diablo.config import DiaBloConfig
from qdiablo.diablo.fingerprint import base_fingerprint, mismatch_message
from qdiablo.diablo.layer import DiaBloLinear
from qdiablo.diablo.targets import find_targets, resolve_target_modules
from qdiablo.errors import UserError
from qdiablo.health import NONFINITE_HINT, require_finite
from qdiablo.io import atomic_path, check_adapter_tensors, read_adapter_weights, read_json

log = logging.getLogger(__name__)

# An adapter folder (the file names PEFT uses; a base checkpoint's weights are model.safetensors).
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
# Keys of adapter_config.json besides the DiaBloConfig fields.
METADATA_KEYS = {
    "method",
    "format_version",
    "base_model_name_or_path",
    "base_fingerprint",
    "trainable_parameters",
    "qdiablo_version",
}

# --------------------------------------------------------------------------------------------
# The wrapper
# --------------------------------------------------------------------------------------------


class DiaBloModel(nn.Module):
    """A causal LM whose target layers carry DiaBlo blocks; everything else is frozen.

    Forwards (and, through attribute fallback, `generate`, `config`, ...) to the wrapped model.
    """

    def __init__(self, model: nn.Module, config: DiaBloConfig):
        super().__init__()
        self.model = model
        # The saved config names the layers, so that loading never depends on today's defaults.
        targets_spec = resolve_target_modules(model, config.target_modules)
        self.diablo_config = config = dataclasses.replace(config, target_modules=targets_spec)
        self.base_model_name_or_path = str(
            getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        )
        targets = find_targets(model, config)
        self.base_fingerprint = base_fingerprint(model, targets)
        for p in model.parameters():
            p.requires_grad_(False)
        block_dtype = getattr(torch, config.block_dtype)
        for name in targets:
            layer = DiaBloLinear(
                model.get_submodule(name),
                config.num_blocks,
                dropout=config.dropout,
                block_dtype=block_dtype,
                indivisible=config.indivisible,
                name=name,
            )
            model.set_submodule(name, layer)
        log.info(
            "DiaBlo: wrapped %d layers with N=%d (%s trainable parameters)",
            len(targets),
            config.num_blocks,
            f"{self.num_trainable_parameters():,}",
        )

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (its target layers are DiaBloLinear until merge_and_unload)."""
        return self.model

    def diablo_layers(self) -> Iterator[tuple[str, DiaBloLinear]]:
        for name, module in self.model.named_modules():
            if isinstance(module, DiaBloLinear):
                yield name, module

    # ---- parameters ----------------------------------------------------------------------

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def num_total_parameters(self) -> int:
        """All parameters, counting packed weights by their logical (unpacked) size."""
        packed = set()
        total = 0
        for module in self.model.modules():
            if callable(getattr(module, "packed_tensors", None)):  # quantizers.QuantLinear
                packed.update(id(p) for p in module.parameters(recurse=False))
                total += module.in_features * module.out_features
        total += sum(
            p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)
            for p in self.model.parameters()  # deduplicated: tied embeddings count once
            if id(p) not in packed
        )
        return total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.num_trainable_parameters(), self.num_total_parameters()
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    # ---- merging -------------------------------------------------------------------------

    def merge_adapter(self) -> None:
        """Add Dᵀ into each nn.Linear base in place (undo with unmerge_adapter)."""
        for _, layer in self.diablo_layers():
            layer.merge()

    def unmerge_adapter(self) -> None:
        for _, layer in self.diablo_layers():
            layer.unmerge()

    def merge_and_unload(self, dtype: torch.dtype | None = None) -> nn.Module:
        """Replace every DiaBloLinear by a plain nn.Linear holding W + Dᵀ and return the model.

        On a quantized base, W is the dequantized weight the blocks were trained against. Layers
        that had no adapter stay as they are (packed layers stay packed).
        """
        for name, layer in list(self.diablo_layers()):
            self.model.set_submodule(name, layer.merged_linear(dtype))
        return self.model

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside this block."""
        layers = [layer for _, layer in self.diablo_layers()]
        for layer in layers:
            layer.adapter_enabled = False
        try:
            yield
        finally:
            for layer in layers:
                layer.adapter_enabled = True

    # ---- saving and loading --------------------------------------------------------------

    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor `adapter_state_dict` holds, by key."""
        return {f"{name}.blocks": tuple(layer.blocks.shape) for name, layer in self.diablo_layers()}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.blocks": layer.blocks.detach() for name, layer in self.diablo_layers()}

    def save_pretrained(
        self, save_directory: str | Path, tensors: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Write adapter_config.json and adapter_model.safetensors, atomically as one folder;
        any other file already in the folder is kept (copied into the new one first).

        `tensors`: the blocks to write (default `adapter_state_dict()`), e.g. gathered from FSDP
        shards."""
        config = {
            "method": "diablo",
            "format_version": FORMAT_VERSION,
            **self.diablo_config.to_dict(),
            "base_model_name_or_path": self.base_model_name_or_path,
            "base_fingerprint": self.base_fingerprint,
            "trainable_parameters": self.num_trainable_parameters(),
            "qdiablo_version": __version__,
        }
        tensors = self.adapter_state_dict() if tensors is None else tensors
        tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
        with atomic_path(save_directory) as tmp:
            old = Path(save_directory)
            if old.is_dir() and not old.is_symlink():  # the user's files there stay
                ours = shutil.ignore_patterns(ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME)
                shutil.copytree(old, tmp, ignore=ours, symlinks=True)
            else:
                tmp.mkdir()
            save_file(tensors, tmp / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
            (tmp / ADAPTER_CONFIG_NAME).write_text(
                json.dumps(config, indent=2, sort_keys=True) + "\n"
            )

    @classmethod
    def from_pretrained(
        cls,
        base_model: nn.Module,
        adapter_dir: str | Path,
        is_trainable: bool = False,
        force: bool = False,
    ) -> DiaBloModel:
        """Load an adapter strictly: keys, shapes and the base fingerprint must all match.

        `force=True` overrides only the fingerprint check (with a warning).
        """
        adapter_dir = Path(adapter_dir)
        saved = read_adapter_config(adapter_dir)
        config = DiaBloConfig.from_dict(
            {k: v for k, v in saved.items() if k not in METADATA_KEYS},
            source=str(adapter_dir / ADAPTER_CONFIG_NAME),
        )
        expected = saved.get("base_fingerprint") or {}
        actual = base_fingerprint(base_model, find_targets(base_model, config))
        if expected.get("sha256") != actual["sha256"]:
            msg = mismatch_message(adapter_dir, expected, actual)
            if not force:
                raise UserError(
                    msg,
                    hint="use the base it was trained on (and its own adapter_config.json); "
                    "only `qdiablo eval --force` (force=True in Python) loads it anyway, export "
                    "and train have no override",
                )
            log.warning("%s (loading anyway: force=True)", msg)
        path = adapter_dir / ADAPTER_WEIGHTS_NAME
        tensors = read_adapter_weights(path)
        require_finite(tensors.items(), f"adapter {path}", hint=NONFINITE_HINT)
        model = cls(base_model, config)
        layers = dict(model.diablo_layers())
        try:
            check_adapter_tensors(path, model.adapter_shapes(), tensors)
        except UserError:
            _unwrap(model)  # the base is left as it was given
            raise
        for name, layer in layers.items():
            t = tensors[f"{name}.blocks"]
            with torch.no_grad():
                layer.blocks.copy_(t)
            layer.blocks.requires_grad_(is_trainable)
        if not is_trainable:
            model.eval()  # as PEFT and transformers return loaded models: no adapter dropout
        return model


def _unwrap(model: DiaBloModel) -> None:
    """Put the original base layers back after a failed load, so the base is left unchanged."""
    for name, layer in list(model.diablo_layers()):
        model.model.set_submodule(name, layer.base_layer)


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """Read and check an adapter's config file; errors name the folder and the field."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UserError(f"adapter folder not found: {adapter_dir}")
    path = adapter_dir / ADAPTER_CONFIG_NAME
    saved = read_json(path, what="adapter config")
    if not isinstance(saved, dict):
        raise UserError(f"{path}: expected a JSON object")
    if saved.get("method") != "diablo":
        raise UserError(
            f"{path}: 'method' is {saved.get('method')!r}, not 'diablo'",
            hint="a PEFT LoRA adapter loads with peft.PeftModel.from_pretrained",
        )
    version = saved.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise UserError(
            f"{path}: written by a newer qdiablo ({saved.get('qdiablo_version', '?')}, adapter "
            f"format {version}); this one reads format {FORMAT_VERSION}",
            hint="upgrade qdiablo to load it",
        )
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: format_version {version!r} is not supported (expected 1)")
    return saved


def get_diablo_model(model: nn.Module, config: DiaBloConfig | None = None) -> DiaBloModel:
    """Freeze `model` and wrap its target layers with zero-initialised DiaBlo blocks."""
    return DiaBloModel(model, config or DiaBloConfig())
