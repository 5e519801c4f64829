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
from collections.abc import Callable, Iterator
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
        apply_umask(target)  # mkdtemp makes 0700 and safetensors writes 0600
        if path.is_dir() and not path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "payload")
            os.replace(target, path)
            # safe: the folder was replaced whole by a payload its caller built to replace it
            # (DiaBloModel.save_pretrained copies the files that are not its own into it first)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # safe: mkdtemp above made it


# Staging folders inside an output; qdiablo.outputs removes them once their writer is gone.
STAGING_PREFIX = ".qdiablo-tmp-"


@contextlib.contextmanager
def staged_dir(path: Path, claim: Callable[[list[str]], None] | None = None) -> Iterator[Path]:
    """Yield a staging folder inside `path`; on success its entries replace the same-named
    entries of `path` (announced first through `claim`), and nothing else in `path` is touched.
    On failure the staging folder vanishes and `path` keeps what it held."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=path))
    try:
        yield tmp
        names = sorted(p.name for p in tmp.iterdir())
        if claim is not None:
            claim(names)
        install_entries(tmp, path, names)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # safe: mkdtemp above made it


def install_entries(staged: Path, target: Path, names: list[str]) -> None:
    """Move `staged/NAME` onto `target/NAME` for each name (a folder replaces a folder), with
    the user's umask; other entries of `target` stay."""
    trash = Path(staged, ".replaced")
    trash.mkdir(exist_ok=True)
    for name in names:
        apply_umask(staged / name)
        if (target / name).is_dir() and not (target / name).is_symlink():
            os.replace(target / name, trash / name)
        os.replace(staged / name, target / name)
    # safe: the staging folder and the entries it replaced, which callers own (OutputFolder
    # refuses before any work when one of its folders to replace holds a file of the user's)
    shutil.rmtree(staged, ignore_errors=True)


def apply_umask(tree: Path) -> None:
    """Files 0666 and folders 0777, less the user's umask, as transformers' saves get:
    temporary folders are 0700 and safetensors writes 0600."""
    umask = os.umask(0)
    os.umask(umask)
    tree = Path(tree)
    for item in [tree, *(tree.rglob("*") if tree.is_dir() else ())]:
        if not item.is_symlink() and item.exists():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


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


def release_host_memory() -> None:
    """Give the memory freed since the last call back to the OS (glibc's `malloc_trim`).

    Block-by-block work frees a block's float weights while the small packed layers it made stay
    allocated between them; glibc keeps such freed heap holes (tensors of a few MB fall below
    its adaptive mmap threshold) in the process: 1.47 instead of 1.08 GiB of peak RSS
    quantizing a 0.34 B model with RTN (docs/scale.md). A no-op where there is no glibc."""
    import ctypes
    import ctypes.util

    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
        except OSError:
            _libc = False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


_libc = None
