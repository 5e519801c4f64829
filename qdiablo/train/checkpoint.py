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

from qdiablo.adapters.registry import method_of
from qdiablo.adapters.scales import load_trained_scales, save_trained_scales
from qdiablo.ownership import remove_owned
from quantizers.fileio import apply_umask

TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def unwrap(model: nn.Module) -> nn.Module:
    """The adapter model inside DDP / accelerate wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


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
        method_of(model).save(model, staged, gathered)
        save_trained_scales(model, staged)  # --train-scales: the base's trained multipliers
        apply_umask(staged)  # safetensors writes 0600
        for item in staged.iterdir():
            os.replace(item, folder / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # safe: mkdtemp above made it


def load_adapter_weights(model: nn.Module, folder: str | Path) -> None:
    """Copy a saved adapter's weights into the live adapter model, strictly."""
    model = unwrap(model)
    method_of(model).load_weights(model, Path(folder))
    load_trained_scales(model, folder, fold=False)


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
