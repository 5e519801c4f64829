"""Adapter-only checkpoints: what is written, how it is read back, and which one to resume.

A checkpoint folder `checkpoints/checkpoint-<step>/` holds
- the adapter alone, in its usual folder format (DiaBlo: `adapter_config.json` +
  `adapter_model.safetensors`; LoRA: PEFT's files), never the frozen base; with
  `--train-scales`, also the base's trained scale multipliers (`trained_scales.safetensors`);
- Trainer's `optimizer.pt`, `scheduler.pt`, `rng_state[_<rank>].pth`, `trainer_state.json` and
  `training_args.bin`.

`trainer_state.json` is written last, so a folder without it is an interrupted save; `--resume auto`
skips those. Reading back is strict: every adapter tensor must be present with its shape, and a
DiaBlo adapter must come from the same base (fingerprint) and the same DiaBlo settings.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from qdiablo.adapters.scales import load_trained_scales, save_trained_scales
from qdiablo.diablo import DiaBloConfig, DiaBloModel
from qdiablo.diablo.fingerprint import mismatch_message
from qdiablo.diablo.model import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    METADATA_KEYS,
    read_adapter_config,
)
from qdiablo.errors import UserError
from qdiablo.health import NONFINITE_HINT, require_finite
from qdiablo.io import check_adapter_tensors, read_adapter_weights
from qdiablo.optional import import_peft, loaded
from qdiablo.ownership import remove_owned
from qdiablo.train.fsdp import copy_full_, is_dtensor, trainable_named
from quantizers.fileio import apply_umask

TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def unwrap(model: nn.Module) -> nn.Module:
    """The adapter model inside DDP / accelerate wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def is_peft_model(model: nn.Module) -> bool:
    peft = loaded("peft")  # a PEFT model exists only once peft is imported
    return peft is not None and isinstance(model, peft.PeftModel)


def save_adapter(
    model: nn.Module, folder: str | Path, gathered: dict[str, torch.Tensor] | None = None
) -> None:
    """Write the adapter's files into `folder` (created if needed), each file atomically.

    The folder itself is not swapped, because other ranks write their RNG state into the same
    checkpoint folder at the same time. `gathered`: the trainable parameters in full, by name
    (`qdiablo.train.fsdp.gather_trainable`), for a model sharded by FSDP.
    """
    model = unwrap(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", suffix=".tmp", dir=folder))
    try:
        staged = tmp / "adapter"
        if isinstance(model, DiaBloModel):
            tensors = None
            if gathered is not None:
                tensors = {k.removeprefix("model."): v for k, v in gathered.items()}
            model.save_pretrained(staged, tensors=tensors)
        elif is_peft_model(model):
            model.save_pretrained(str(staged), save_embedding_layers=False, state_dict=gathered)
        else:
            raise TypeError(f"cannot save an adapter from a {type(model).__name__}")
        save_trained_scales(model, staged)  # --train-scales: the base's trained multipliers
        apply_umask(staged)  # safetensors writes 0600
        for item in staged.iterdir():
            os.replace(item, folder / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # safe: mkdtemp above made it


def load_adapter_weights(model: nn.Module, folder: str | Path) -> None:
    """Copy a saved adapter's weights into the live adapter model, strictly."""
    model = unwrap(model)
    folder = Path(folder)
    if isinstance(model, DiaBloModel):
        _load_diablo(model, folder)
    elif is_peft_model(model):
        _load_lora(model, folder)
    else:
        raise TypeError(f"cannot load adapter weights into a {type(model).__name__}")
    load_trained_scales(model, folder, fold=False)


def _load_diablo(model: DiaBloModel, folder: Path) -> None:
    saved = read_adapter_config(folder)
    config = DiaBloConfig.from_dict(
        {k: v for k, v in saved.items() if k not in METADATA_KEYS},
        source=str(folder / ADAPTER_CONFIG_NAME),
    )
    if config.to_dict() != model.diablo_config.to_dict():
        diff = [
            f"{k}: saved {v!r}, now {model.diablo_config.to_dict()[k]!r}"
            for k, v in config.to_dict().items()
            if model.diablo_config.to_dict()[k] != v
        ]
        raise UserError(
            f"{folder / ADAPTER_CONFIG_NAME}: other DiaBlo settings ({'; '.join(diff)})"
        )
    expected = saved.get("base_fingerprint") or {}
    if expected.get("sha256") != model.base_fingerprint["sha256"]:
        raise UserError(mismatch_message(folder, expected, model.base_fingerprint))
    tensors = read_adapter_weights(folder / ADAPTER_WEIGHTS_NAME)
    require_finite(tensors.items(), str(folder / ADAPTER_WEIGHTS_NAME), hint=NONFINITE_HINT)
    check_adapter_tensors(folder / ADAPTER_WEIGHTS_NAME, model.adapter_shapes(), tensors)
    with torch.no_grad():
        for name, layer in model.diablo_layers():
            copy_full_(layer.blocks, tensors[f"{name}.blocks"])


def _load_lora(model, folder: Path) -> None:
    utils = import_peft("peft.utils")
    get_peft_model_state_dict = utils.get_peft_model_state_dict
    set_peft_model_state_dict = utils.set_peft_model_state_dict

    path = folder / "adapter_model.safetensors"
    tensors = read_adapter_weights(path)
    require_finite(tensors.items(), str(path), hint=NONFINITE_HINT)
    expected = get_peft_model_state_dict(model)
    check_adapter_tensors(path, {k: tuple(v.shape) for k, v in expected.items()}, tensors)
    trainable = dict(trainable_named(model))
    if any(is_dtensor(p) for p in trainable.values()):  # sharded by FSDP: copy each shard
        adapter = getattr(model, "active_adapter", "default")
        for name, param in trainable.items():
            copy_full_(param, tensors[name.replace(f".{adapter}.", ".")])
        return
    set_peft_model_state_dict(model, tensors)


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (a missing or unparseable state file,
    named), or None when it is complete."""
    import json
    import zipfile

    folder = Path(folder)
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE}"
    try:
        data = json.loads(state.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{state} does not parse: {e}"
    if not isinstance(data, dict) or not isinstance(data.get("global_step"), int):
        return f"{state} has no global_step"
    for name in ("optimizer.pt", "scheduler.pt"):
        path = folder / name
        if path.exists() and not zipfile.is_zipfile(path):
            return f"{path} is truncated or not a torch file"
    weights = [p for p in folder.glob("*.safetensors")]
    if not weights:
        return "no adapter weights (*.safetensors)"
    for path in weights:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
        if len(head) < 8 or int.from_bytes(head, "little") > size - 8:
            return f"{path} is truncated"
    return None


def _by_step(folder: Path) -> list[tuple[int, Path]]:
    found = []
    for child in folder.iterdir() if folder.is_dir() else ():
        m = _CHECKPOINT.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def rotate_checkpoints(folder: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (by step, not by a folder's mtime, which a file the
    user drops in changes); older ones lose the files training wrote, and go if then empty."""
    for _, child in _by_step(folder)[:-keep]:
        remove_owned(folder.parent, "train", [f"{folder.name}/{child.name}"])


def latest_checkpoint(folder: str | Path, warn: bool = True) -> Path | None:
    """The newest complete `checkpoint-<step>` folder; newer ones whose state files are missing
    or do not parse are skipped, with a warning naming the file."""
    import logging

    for _, child in reversed(_by_step(Path(folder))):
        problem = checkpoint_problem(child)
        if problem is None:
            return child
        if warn and (child / TRAINER_STATE).exists():
            logging.getLogger(__name__).warning("skipping checkpoint %s: %s", child, problem)
    return None
