"""Atomic writes and JSON I/O: a crash never leaves a half-written file or folder that looks whole.

The one copy of these helpers: `quantizers` writes its checkpoints with them, and `qdiablo.io`
re-exports them (with its own error type for user-facing reads), since `quantizers` imports
nothing from `qdiablo`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    Works for files and folders alike: write into the yielded path, and on success it replaces
    `path` (an existing folder is swapped out and removed). On failure the temporary is removed
    and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / "payload"
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "payload")
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write a JSON file atomically, pretty-printed and key-sorted for stable diffs."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(
    path: str | os.PathLike, what: str = "JSON file", error: type[Exception] = ValueError
) -> Any:
    """Read a JSON file; a missing or malformed file raises `error` naming it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
