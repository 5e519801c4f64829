"""sha256 of files and adapter folders: one helper for manifests, stage identities and records."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK = 1 << 20


def update_from_file(digest, path: str | os.PathLike) -> None:
    """Feed a file's bytes into `digest`, a chunk at a time (large checkpoints stay out of RAM)."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of one file."""
    digest = hashlib.sha256()
    update_from_file(digest, path)
    return digest.hexdigest()


def adapter_digest(folder: str | os.PathLike) -> str:
    """sha256 over an adapter folder's weight files (*.safetensors, then *.bin), names included.

    Adapters are small, so this takes well under a second; evaluation records it so that a
    retrained adapter in the same folder never resumes the old one's results.
    """
    digest = hashlib.sha256()
    folder = Path(folder)
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest.update(f.name.encode())
        update_from_file(digest, f)
    return digest.hexdigest()
