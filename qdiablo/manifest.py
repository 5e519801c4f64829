"""manifest.json: the sha256 and size of every file of an export, checked before loading.

An export is copied between machines and disks; a truncated download or a hand-edited file must be
caught before the weights are used, with an error that names the file. The loadable parts
(`base/`, `adapter/`, `merged/`, `merged-gptq/`,
`marlin/`, `gguf/`) must hold exactly the files listed; anywhere
else, an unlisted weights file is an error too (a stray `*.safetensors` could be picked up by a
loader), and other unlisted files only get a warning.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from qdiablo import __version__
from qdiablo.errors import UserError
from qdiablo.hashing import sha256_file
from qdiablo.io import read_json
from qdiablo.outputs import is_bookkeeping

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT = "qdiablo-export"
FORMAT_VERSION = 1
# Folders a loader reads: they must hold exactly the files listed.
LOADABLE_PARTS = ("base", "adapter", "merged", "merged-gptq", "marlin", "gguf")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")


def _files(folder: Path) -> list[str]:
    """Every regular file under `folder` but the manifest, as sorted POSIX relative paths."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_NAME
    )


def build_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a finished export folder (every file's sha256 and size)."""
    folder = Path(folder)
    files = {
        rel: {"sha256": sha256_file(folder / rel), "size": (folder / rel).stat().st_size}
        for rel in _files(folder)
    }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "qdiablo_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parts": [p for p in LOADABLE_PARTS if (folder / p).is_dir()],
        "files": files,
    }


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and check the shape of an export's manifest.json."""
    path = Path(folder) / MANIFEST_NAME
    if not Path(folder).is_dir():
        raise UserError(f"export folder not found: {folder}")
    manifest = read_json(path, what="export manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a qdiablo export manifest (format != {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported "
            f"(expected {FORMAT_VERSION})"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and {"sha256", "size"} <= v.keys() for v in files.values()
    ):
        raise UserError(f"{path}: 'files' must map each path to its sha256 and size")
    return manifest


def verify_export(path: str | Path, *, hashes: bool = True) -> dict[str, Any]:
    """Check an export folder against its manifest and return the manifest.

    Every listed file must exist with its size and (unless `hashes=False`) its sha256; the
    loadable parts must hold no unlisted file, and no unlisted weights file may lie anywhere.
    Raises a UserError naming the first offending file.
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    listed: dict[str, dict[str, Any]] = manifest["files"]
    hint = "re-copy the export, or re-run `qdiablo export`"
    for rel, entry in sorted(listed.items()):
        file = folder / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise UserError(f"{folder / MANIFEST_NAME}: invalid path {rel!r}")
        if not file.is_file():
            raise UserError(f"{file}: missing (listed in {MANIFEST_NAME})", hint=hint)
        size = file.stat().st_size
        if size != entry["size"]:
            raise UserError(
                f"{file}: {size} bytes, but {MANIFEST_NAME} records {entry['size']}", hint=hint
            )
        if hashes and sha256_file(file) != entry["sha256"]:
            raise UserError(
                f"{file}: sha256 does not match {MANIFEST_NAME} (corrupted or edited)", hint=hint
            )
    for rel in _files(folder):
        if rel in listed or is_bookkeeping(rel):
            continue
        part = rel.split("/", 1)[0]
        if part in LOADABLE_PARTS or rel.endswith(WEIGHT_SUFFIXES):
            raise UserError(f"{folder / rel}: not listed in {MANIFEST_NAME}", hint=hint)
        log.warning("%s: not listed in %s (ignored)", folder / rel, MANIFEST_NAME)
    return manifest


def is_export_folder(path: str | Path) -> bool:
    """A folder written by `qdiablo export`: it holds manifest.json and base/."""
    folder = Path(path)
    return (folder / MANIFEST_NAME).is_file() and (folder / "base").is_dir()
