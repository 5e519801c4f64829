"""Safetensors checkpoints read and written a module at a time, so a large model never has to sit
whole in memory.

`ShardedCheckpoint` maps each tensor name of a Hugging Face folder (one `model.safetensors` or
shards listed by `model.safetensors.index.json`) to its file and reads only the tensors asked
for; `materialize` fills a module built on the meta device from them. `ShardWriter` writes
tensors as they come, closing a shard whenever the next tensor would take it past
`max_shard_size`, and ends with the Hugging Face names (`model.safetensors` alone, or
`model-0000k-of-0000n.safetensors` plus the index).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from quantizers.fileio import apply_umask

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Transformers' own default was 5 GB per shard until v5; small enough to hold one in memory.
DEFAULT_SHARD_BYTES = 5 * 10**9


class CheckpointKeysError(ValueError):
    """The checkpoint's tensor names do not match the model's (a renamed or converted layout)."""


class ShardedCheckpoint:
    """The tensors of a safetensors folder, read on demand (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if (self.folder / WEIGHTS_NAME).is_file():
            with safe_open(self.folder / WEIGHTS_NAME, framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), self.folder / WEIGHTS_NAME)
        elif index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no weight_map")
            self.files = {k: self.folder / v for k, v in weight_map.items()}
            for file in sorted(set(self.files.values())):
                if not file.is_file():
                    raise FileNotFoundError(f"{file} (listed in {INDEX_NAME}) is missing")
        else:
            raise FileNotFoundError(f"{self.folder}: no {WEIGHTS_NAME} or {INDEX_NAME}")

    @staticmethod
    def present(folder: str | os.PathLike) -> bool:
        """Whether `folder` holds a safetensors checkpoint this class reads."""
        folder = Path(folder)
        return (folder / WEIGHTS_NAME).is_file() or (folder / INDEX_NAME).is_file()

    def keys(self) -> set[str]:
        return set(self.files)

    def read(
        self,
        names: Iterable[str],
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> dict[str, Tensor]:
        """The named tensors on `device`, floating ones cast to `dtype` (None: as stored). Each
        file is opened once per call and closed after, so its pages leave the process."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise KeyError(f"{self.folder}: no tensor '{name}'")
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, keys in by_file.items():
            with safe_open(file, framework="pt", device=str(device)) as f:
                for key in keys:
                    t = f.get_tensor(key)
                    out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out

    def header_digest(self) -> dict[str, int]:
        """Each file's size by name: what identifies the checkpoint without reading it."""
        return {p.name: p.stat().st_size for p in sorted(set(self.files.values()))}


def persistent_tensors(module: nn.Module) -> dict[str, Tensor]:
    """The module's parameters and persistent buffers by state-dict name (shared ones once)."""
    return dict(module.state_dict(keep_vars=True))


def materialize(
    module: nn.Module,
    prefix: str,
    checkpoint: ShardedCheckpoint,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    names: Iterable[str] | None = None,
) -> None:
    """Give every meta tensor of `module` (or those in `names`) its value `prefix + name` from
    the checkpoint, on `device`, floating ones in `dtype`. Real persistent buffers the checkpoint
    holds are loaded too (as from_pretrained does); tensors shared between submodules stay
    shared. A missing name is a CheckpointKeysError."""
    wanted = persistent_tensors(module)
    if names is not None:
        keep = set(names)
        wanted = {k: v for k, v in wanted.items() if k in keep}
    todo = {
        k: v
        for k, v in wanted.items()
        if v.is_meta or (not isinstance(v, nn.Parameter) and prefix + k in checkpoint.files)
    }
    # A tensor shared by several names (a tied head) is read under the name the file holds.
    source: dict[int, str] = {}
    for key, value in todo.items():
        if prefix + key in checkpoint.files:
            source.setdefault(id(value), prefix + key)
    missing = [prefix + k for k, v in todo.items() if id(v) not in source]
    if missing:
        raise CheckpointKeysError(
            f"{checkpoint.folder}: no tensor {', '.join(missing[:3])}"
            + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
        )
    values = checkpoint.read(sorted(set(source.values())), device, dtype)
    done: dict[int, Tensor] = {}
    for key, old in todo.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if id(old) in done:  # a shared (tied) tensor: one value for every place it appears
            new = done[id(old)]
        else:
            value = values[source[id(old)]]
            if tuple(value.shape) != tuple(old.shape):
                raise CheckpointKeysError(
                    f"{checkpoint.folder}: tensor '{source[id(old)]}' has shape "
                    f"{list(value.shape)}, the model expects {list(old.shape)}"
                )
            if isinstance(old, nn.Parameter):
                new = nn.Parameter(value, requires_grad=old.requires_grad)
            else:
                new = value
            done[id(old)] = new
        if leaf in owner._parameters:
            owner._parameters[leaf] = new
        else:
            owner._buffers[leaf] = new


class ShardWriter:
    """Write tensors into safetensors shards of at most `max_shard_size` bytes as they come
    (see the module docstring). Only the current shard's tensors are held."""

    def __init__(
        self,
        folder: str | os.PathLike,
        max_shard_size: int = DEFAULT_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_size = max_shard_size
        self.metadata = metadata
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: Tensor) -> None:
        """Queue one tensor (moved to the host, made contiguous); a full shard is written first."""
        if name in self.pending or any(name in keys for _, keys in self.written):
            raise ValueError(f"tensor '{name}' written twice")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_size:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        """Write the queued tensors as the next shard (a temporary name until `finish`)."""
        if not self.pending:
            return
        path = self.folder / f".shard-{len(self.written) + 1:05d}.safetensors"
        save_file(self.pending, path, metadata=self.metadata)
        self.written.append((path, sorted(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, give the shards their final names (and the index when there are
        several) and return the file names written."""
        self.flush()
        if not self.written:
            raise ValueError(f"{self.folder}: no tensors to write")
        for path, _ in self.written:
            apply_umask(path)  # safetensors creates its files 0600
        if len(self.written) == 1:
            os.replace(self.written[0][0], self.folder / WEIGHTS_NAME)
            return [WEIGHTS_NAME]
        n = len(self.written)
        weight_map, names = {}, []
        for k, (path, keys) in enumerate(self.written, start=1):
            name = f"model-{k:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.folder / name)
            names.append(name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        (self.folder / INDEX_NAME).write_text(text, encoding="utf-8")
        return [*names, INDEX_NAME]
