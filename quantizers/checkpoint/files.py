"""The weights files of a GPTQ-layout folder: which files hold which tensor (one file or a
sharded index, nothing else), and each tensor's shape and dtype read from the headers without
loading any data, with what is wrong with a damaged file named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from quantizers.checkpoint.settings import INDEX_NAME, WEIGHTS_NAME, CheckpointError, read_object


def read_header(file: Path) -> dict[str, dict[str, Any]]:
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


SAFETENSORS_DTYPES = {
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


def weight_files(directory: Path) -> dict[str, Path]:
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
        weight_map = read_object(index).get("weight_map")
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


def read_headers(files: dict[str, Path]) -> dict[str, tuple[Path, dict[str, Any]]]:
    """tensor name -> (file, header info) for every tensor of every listed file; a listed file
    that is missing is an error naming it."""
    headers: dict[str, tuple[Path, dict[str, Any]]] = {}
    for file in sorted(set(files.values())):
        if not file.is_file():
            raise CheckpointError(f"{file}: file not found (listed in {INDEX_NAME})")
        for name, info in read_header(file).items():
            headers[name] = (file, info)
    return headers
