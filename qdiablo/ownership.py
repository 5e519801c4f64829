"""Which files under an output folder a verb wrote, and removing those alone.

A verb's marker `.qdiablo-<verb>.json` lists the top-level names it wrote (`files`) and, for a
folder it installed whole, every file it put inside (`inside`, relative POSIX paths). Inside its
own folders a verb also owns the files it writes there by name (`INSIDE`, e.g. train's
`checkpoints/checkpoint-*/optimizer.pt`, written by Hugging Face Trainer). Everything else is the
user's: `remove_owned` removes a verb's files and the folders they leave empty, keeps the rest
and names it. A folder holding another verb's marker (a pipeline's stage folder) is handled by
that verb's own rules.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qdiablo.io import write_json

log = logging.getLogger("qdiablo.outputs")

LOCK_NAME = ".qdiablo.lock"
STAGE_FILES = ("stages/*.json", "stages/*.args.yaml")  # a pipeline root's stage markers
ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "README.md",  # PEFT writes a card beside a LoRA adapter
    "trained_scales.safetensors",  # --train-scales (qdiablo.adapters.scales.SCALES_FILE)
)
CHECKPOINT_FILES = (
    *ADAPTER_FILES,
    "trainer_state.json",
    "training_args.bin",
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state.pth",
    "rng_state_*.pth",
)
# Relative paths (one glob per path component) a verb owns inside the folders it writes; a
# pattern ending in "/**" owns that folder whole (a temporary folder of the verb's own).
INSIDE: dict[str, tuple[str, ...]] = {
    "train": (
        *(f"adapter/{n}" for n in ADAPTER_FILES),
        "adapter/.adapter.*.tmp/**",  # an interrupted save of the final adapter
        "checkpoints/checkpoint-*",
        *(f"checkpoints/checkpoint-*/{n}" for n in CHECKPOINT_FILES),
        "checkpoints/checkpoint-*/.adapter.*.tmp/**",  # an interrupted adapter save
    ),
    "run": STAGE_FILES,
    "demo": STAGE_FILES,
    "compare": (*STAGE_FILES, "bases/*", "train/*", "eval/*"),
}


def marker_name(verb: str) -> str:
    return f".qdiablo-{verb}.json"


def is_bookkeeping(name: str) -> bool:
    """A lock or a marker: not part of what a verb outputs."""
    return name == LOCK_NAME or (name.startswith(".qdiablo-") and name.endswith(".json"))


def read_marker(folder: Path, verb: str) -> dict[str, Any] | None:
    """A folder's marker for `verb`, or None when absent or unreadable."""
    path = folder / marker_name(verb)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s: unreadable marker, treated as absent", path)
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        return None
    return data


def markers_in(folder: Path) -> dict[str, dict[str, Any]]:
    """Every verb marker in a folder, by verb."""
    found = {}
    for item in sorted(folder.glob(".qdiablo-*.json")) if folder.is_dir() else ():
        verb = item.name[len(".qdiablo-") : -len(".json")]
        data = read_marker(folder, verb)
        if data is not None:
            found[verb] = data
    return found


def _match(rel: tuple[str, ...], patterns: tuple[str, ...], listed: frozenset[str]) -> str | None:
    """'tree' (owned whole), 'own' or None for a path relative to the verb's folder: `patterns`
    are globs (one per component), `listed` literal file paths (their folders count as own)."""
    joined = "/".join(rel)
    if joined in listed or any(p.startswith(joined + "/") for p in listed):
        return "own"
    for pattern in patterns:
        parts = pattern.split("/")
        tree = parts[-1] == "**"
        if tree:
            parts = parts[:-1]
            if len(rel) >= len(parts) and all(
                fnmatch.fnmatchcase(r, p) for r, p in zip(rel, parts)
            ):
                return "tree"
        elif len(rel) == len(parts) and all(fnmatch.fnmatchcase(r, p) for r, p in zip(rel, parts)):
            return "own"
    return None


def remove_path(path: Path) -> None:
    """Remove a file, a link or a folder tree. Callers pass only what a verb owns whole."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)  # safe: the caller owns the whole tree (a verb's temporary folder)
    else:
        path.unlink(missing_ok=True)


def remove_owned(
    folder: Path, verb: str, names: Iterable[str], inside: Iterable[str] = ()
) -> list[Path]:
    """Remove the top-level `names` that `verb` wrote in `folder`, descending into folders to
    remove only the verb's own files (`inside` from its marker, plus `INSIDE[verb]`); a folder
    left empty goes. Returns the files kept (not the verb's), after naming them in one line."""
    kept = _remove_owned(folder, verb, names, inside)
    if kept:
        shown = ", ".join(str(p) for p in kept[:5]) + (", ..." if len(kept) > 5 else "")
        log.warning("kept %d file(s) `qdiablo %s` did not write: %s", len(kept), verb, shown)
    return kept


def remove_output(folder: Path, verb: str) -> list[Path]:
    """Remove everything `verb`'s marker in `folder` says it wrote; the rest stays (returned,
    and named in one log line). See `_forget` for the marker."""
    data = read_marker(folder, verb)
    if data is None:
        return []
    _unfinish(folder, verb, data)
    _remove_owned(folder, verb, data["files"], data.get("inside") or ())
    _forget(folder, verb, data)
    kept = [f for item in sorted(folder.iterdir()) if not is_bookkeeping(item.name)
            for f in _files_of(item)]  # fmt: skip
    if kept:
        shown = ", ".join(str(p) for p in kept[:5]) + (", ..." if len(kept) > 5 else "")
        log.warning("kept %d file(s) `qdiablo %s` did not write: %s", len(kept), verb, shown)
    return kept


def _unfinish(folder: Path, verb: str, data: dict[str, Any]) -> None:
    """Mark an output unfinished before removing any of it (a kill midway must not leave a
    finished-looking marker over a half-removed output)."""
    if data.get("complete") is not False:
        write_json(folder / marker_name(verb), {**data, "complete": False})


def _forget(folder: Path, verb: str, data: dict[str, Any]) -> None:
    """After its output was removed: the marker goes, unless some of the verb's own folders
    stay because they hold the user's files; it then lists those folders alone, unfinished, so
    that the next run of the verb still knows them as its own (and writes among those files)."""
    left = sorted(n for n in data["files"] if (folder / n).exists())
    path = folder / marker_name(verb)
    if not left:
        path.unlink(missing_ok=True)
        return
    write_json(path, {**data, "complete": False, "files": left, "inside": []})


def unowned_files(
    folder: Path, verb: str, names: Iterable[str], inside: Iterable[str] = ()
) -> list[Path]:
    """The files under the top-level folders `names` that `verb` did not write (nothing is
    removed): what replacing those folders whole would lose."""
    patterns, listed = INSIDE.get(verb, ()), frozenset(inside)
    found = []
    for name in names:
        path = folder / name
        if not path.is_dir() or path.is_symlink():
            continue
        for item in sorted(path.rglob("*")):
            if item.is_dir() and not item.is_symlink():
                continue
            rel = item.relative_to(folder).parts
            for depth in range(2, len(rel) + 1):
                verdict = _match(rel[:depth], patterns, listed)
                if verdict != "own":
                    break
            if verdict != "tree" and not (verdict == "own" and depth == len(rel)):
                found.append(item)
    return found


def _remove_owned(
    folder: Path, verb: str, names: Iterable[str], inside: Iterable[str]
) -> list[Path]:
    patterns, listed = INSIDE.get(verb, ()), frozenset(inside)
    kept: list[Path] = []
    for name in sorted(set(names)):
        rel = tuple(name.split("/"))  # a top-level name, or a path to an owned folder inside
        if any(r in ("", ".", "..") for r in rel) or is_bookkeeping(rel[-1]):
            continue
        kept += _remove(folder.joinpath(*rel), rel, patterns, listed)
    return kept


def _remove(
    path: Path, rel: tuple[str, ...], patterns: tuple[str, ...], listed: frozenset[str]
) -> list[Path]:
    """Remove `path` (owned), keeping what below it is not owned; returns the kept files."""
    if not (path.exists() or path.is_symlink()):
        return []
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return []
    kept: list[Path] = []
    handled: set[str] = set()
    nested = markers_in(path)
    for verb, data in nested.items():  # another verb's output (a stage folder): its own rules
        _unfinish(path, verb, data)
        kept += _remove_owned(path, verb, data["files"], data.get("inside") or ())
        handled |= set(data["files"])
        _forget(path, verb, data)
    if not nested:
        for child in sorted(path.iterdir()):
            verdict = _match((*rel, child.name), patterns, listed)
            if verdict == "tree":
                remove_path(child)  # safe: a temporary folder of the verb's own (INSIDE "/**")
            elif verdict == "own":
                kept += _remove(child, (*rel, child.name), patterns, listed)
            if verdict:
                handled.add(child.name)
    for child in sorted(path.iterdir()):
        if child.name not in handled and not is_bookkeeping(child.name):
            kept += _files_of(child)
    if not any(path.iterdir()):
        path.rmdir()
    return kept


def _files_of(path: Path) -> list[Path]:
    """The files under a kept entry (the entry itself when it is a file or an empty folder)."""
    if path.is_dir() and not path.is_symlink():
        return [p for p in sorted(path.rglob("*")) if not p.is_dir()] or [path]
    return [path]
