"""One rule for every verb's output folder: never delete what the verb did not write.

    with OutputFolder("runs/q2", "quantize", overwrite=args.overwrite) as out:
        out.claim(["model.safetensors", ...])   # before writing them
        ...                                     # write
        out.finish()                            # the completion marker, written last

- A folder holding anything the verb did not write is refused unless `overwrite` (or unless it
  already holds this verb's output: a rerun, a resume); only the verb's own files are ever
  removed or replaced (`qdiablo.ownership`: the names its marker lists, the files it wrote
  inside its own folders), never others. A name of the user's that the verb would write over is
  refused even with `overwrite`.
- The verb's marker `.qdiablo-<verb>.json` lists the names it wrote and, once `finish()` ran,
  `"complete": true`: a folder without it is unfinished, and loaders refuse it
  (`qdiablo.inputs`).
- A finished output is replaced only with `overwrite`, for every verb; a resumable verb (train,
  eval, the pipelines) run again into its own folder continues it instead.
- `.qdiablo.lock` holds the writer's pid: a second writer is refused; a lock whose process is
  gone is taken over, and the temporary folders that process left behind are removed.
- The current folder (or one above it) is refused as an output: its files are the user's.
- An operating-system fault (read-only, permission, no space, a path too long) while holding the
  folder is one line naming the path (`qdiablo.faults`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qdiablo import __version__
from qdiablo.errors import UserError
from qdiablo.faults import guard
from qdiablo.io import write_json
from qdiablo.locks import acquire_lock, held_count, process_alive, read_lock, release_lock
from qdiablo.ownership import (
    LOCK_NAME,
    is_bookkeeping,
    marker_name,
    read_marker,
    remove_owned,
    remove_path,
    unowned_files,
)
from quantizers.fileio import STAGING_PREFIX, install_entries

log = logging.getLogger(__name__)

__all__ = [
    "LOCK_NAME",
    "OutputFolder",
    "acquire_lock",
    "check_not_current_folder",
    "is_bookkeeping",
    "marker_name",
    "release_lock",
]

MARKER_FORMAT_VERSION = 1
# Folders (resolved) a holder has started changing: a nested holder of the same folder (eval's
# command and library both hold it) must not restore the earlier marker after the other wrote.
_changed: set[str] = set()
# tempfile.mkdtemp names of atomic writes (qdiablo.io.atomic_path): .NAME.XXXXXXXX.tmp / .old
_ATOMIC_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.(tmp|old)$")


def _is_leftover(name: str) -> bool:
    return name.startswith(STAGING_PREFIX) or bool(_ATOMIC_TEMP.match(name))


def check_not_current_folder(path: Path, flag: str = "--output") -> None:
    """Refuse `.` or any folder above it: the user's own files live there."""
    here = Path.cwd().resolve()
    target = path.expanduser().resolve()
    if target == here or target in here.parents:
        raise UserError(
            f"{flag} {path} is the current folder{'' if target == here else ' or above it'}: "
            "refusing to write a verb's files among yours",
            hint=f"name a new subfolder, e.g. {flag} {Path(path, 'out')}",
        )


class OutputFolder:
    """An output folder held by one verb run (see the module docstring).

    `resumable`: keep the files of an earlier unfinished or finished run of the same verb
    (train, eval resume from them); otherwise they are replaced by this run's files and the ones
    this run does not write again are removed at `finish()`.
    `known`: the top-level names this verb writes. In a folder without a marker (written by an
    older qdiablo) they are adopted as the verb's own when the folder holds `signature` (e.g.
    train_config.json, which only this verb writes); otherwise they are the user's, and one the
    verb would write over is refused even with `overwrite`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        verb: str,
        *,
        overwrite: bool = False,
        resumable: bool = False,
        known: Iterable[str] = (),
        flag: str = "--output",
        lock: bool = True,
        signature: str | None = None,
    ):
        self.path = Path(path)
        self.verb = verb
        self.overwrite = overwrite
        self.resumable = resumable
        self.known = set(known)
        self.flag = flag
        self.use_lock = lock
        self.signature = signature
        self.previous: dict[str, Any] | None = None
        self.files: set[str] = set()  # claimed by this run
        self.inside: set[str] = set()  # files this run installed inside its folders
        self.pending: set[str] = set()  # an earlier output's, removed at finish unless claimed
        self.foreign: set[str] = set()  # the user's top-level names, never touched
        self.changed = False  # this run removed or wrote something of the folder's
        self._locked = False
        self._created = False

    # -- opening ----------------------------------------------------------------------------
    def __enter__(self) -> OutputFolder:
        self.open()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            # On a full or read-only disk the marker may not be writable: the error in flight
            # is the one to report.
            with contextlib.suppress(OSError):
                self._undo_if_untouched()
        self.release()

    def changing(self) -> None:
        """Say that this run starts changing the folder: a failure from here on leaves its
        marker unfinished (before, the folder and its marker stay as they were)."""
        self.changed = True
        _changed.add(str(self.path.resolve()))

    def _undo_if_untouched(self) -> None:
        """A run that failed before changing anything leaves the folder as it found it."""
        on_disk = read_marker(self.path, self.verb) or {}
        before = set((self.previous or {}).get("files", ()))
        claimed = (self.files | set(on_disk.get("files", ()))) - before
        touched = self.changed or str(self.path.resolve()) in _changed
        if touched or (self.entries() & claimed):
            return
        if self.previous is not None:
            write_json(self.marker, self.previous)  # the earlier output is still whole
            return
        self.marker.unlink(missing_ok=True)
        if self._created:
            self.release()
            with contextlib.suppress(OSError):
                for item in self.path.iterdir():
                    if _is_leftover(item.name):
                        remove_path(item)  # our own temporary folder (see _is_leftover)
                self.path.rmdir()

    @property
    def marker(self) -> Path:
        return self.path / marker_name(self.verb)

    def open(self) -> OutputFolder:
        check_not_current_folder(self.path, self.flag)
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.flag} {self.path} exists and is not a folder")
        with guard(self.path):
            self._created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            if self.use_lock:
                self._lock()
        try:
            with guard(self.path):
                self._open_held()
        except BaseException:
            if self._created:
                with contextlib.suppress(OSError):
                    self._undo_if_untouched()
            self.release()
            raise
        return self

    def _open_held(self) -> None:
        self._remove_leftovers()
        self.previous = read_marker(self.path, self.verb)
        owned = set(self.previous["files"]) if self.previous else set()
        if self.previous is None and self.signature and (self.path / self.signature).exists():
            owned = self.known & self.entries()  # written before markers existed: adopted
        self.foreign = self.entries() - owned
        self._check_foreign()
        finished = bool(self.previous and self.previous.get("complete"))
        if finished and not self.resumable and not self.overwrite:
            raise UserError(
                f"{self.flag} {self.path} already holds a finished `qdiablo {self.verb}` output",
                hint="pass --overwrite to replace it (only its own files go), or choose another "
                "folder",
            )
        self.inside = set((self.previous or {}).get("inside") or ())
        if not self.resumable:  # the earlier output stays whole until this one is installed
            self.pending = owned
            self._write_marker(complete=False)
            return
        self.files = set(owned)
        self._write_marker(complete=False)  # unfinished before anything of it goes
        if self.overwrite:  # train/eval write as they go: start from a clean slate
            self.remove_own(owned, self.inside)
            # its folders that stay (they hold the user's files) are still its own
            self.previous, self.inside = None, set()
            self.files = {n for n in owned if (self.path / n).exists()}
            self._write_marker(complete=False)

    def _check_foreign(self) -> None:
        """Refuse to start writing among the user's files without `overwrite`; once the folder
        holds this verb's output (its marker), its files there were accepted then and stay."""
        if self.foreign and not self.overwrite and self.previous is None:
            shown = ", ".join(sorted(self.foreign)[:5]) + (", ..." if len(self.foreign) > 5 else "")
            raise UserError(
                f"{self.flag} {self.path} holds files `qdiablo {self.verb}` did not write "
                f"({shown})",
                hint=f"choose another {self.flag}, or pass --overwrite (it replaces only "
                f"{self.verb}'s own files and keeps these)",
            )
        clash = sorted(self.foreign & self.known)
        if clash:
            raise UserError(
                f"{self.flag} {self.path} holds {', '.join(clash[:5])}, which `qdiablo "
                f"{self.verb}` writes but did not write there: refusing to write over it",
                hint=f"move {'it' if len(clash) == 1 else 'them'} away, or choose another "
                f"{self.flag}",
            )

    def entries(self) -> set[str]:
        """Top-level names in the folder, bookkeeping and crash leftovers aside."""
        return {
            p.name
            for p in self.path.iterdir()
            if not is_bookkeeping(p.name) and not _is_leftover(p.name)
        }

    def remove_own(self, names: Iterable[str], inside: Iterable[str] = ()) -> list[Path]:
        """Remove the verb's own `names` (inside them, only its own files); returns what was
        kept, the user's."""
        present = [n for n in names if (self.path / n).exists() or (self.path / n).is_symlink()]
        if not present:
            return []
        self.changed = True
        for name in sorted(present):
            log.info(
                "removing %s (written by an earlier `qdiablo %s`)", self.path / name, self.verb
            )
        return remove_owned(self.path, self.verb, present, inside)

    def foreign_inside(self, names: Iterable[str]) -> list[Path]:
        """Files of the user's inside the verb's own top-level folders `names`."""
        own = set(names) & (self.files | self.pending)
        return unowned_files(self.path, self.verb, own, self.inside)

    # -- writing ----------------------------------------------------------------------------
    def claim(self, names: Iterable[str], inside: Iterable[str] = ()) -> None:
        """Record top-level names (and files inside folders, as relative paths) as this verb's
        before writing them (crash-safe ownership). A name of the user's is refused."""
        new = {str(n) for n in names} - self.files
        clash = sorted(new & self.foreign)
        if clash:
            raise UserError(
                f"{self.path / clash[0]} was not written by `qdiablo {self.verb}`: refusing to "
                "write over it",
                hint=f"move it away, or choose another {self.flag}",
            )
        new_inside = {str(n) for n in inside} - self.inside
        if new or new_inside:
            self.files |= new
            self.inside |= new_inside
            self._write_marker(complete=False)

    def unclaim(self, names: Iterable[str]) -> None:
        """Forget names this run claimed and has removed again (e.g. quantize's resume area)."""
        gone = {str(n) for n in names}
        if gone & (self.files | self.pending):
            self.files -= gone
            self.pending -= gone
            self._write_marker(complete=False)

    def staging(self) -> Path:
        """A new temporary folder inside the output (removed on the next run if left behind)."""
        import tempfile

        return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.path))

    def install(self, staged: Path) -> None:
        """Move every entry of a staging folder into the output (claiming it, and every file
        inside its folders, first), replacing same-named entries only; the staging folder is
        removed."""
        names = sorted(p.name for p in staged.iterdir())
        inside = [
            p.relative_to(staged).as_posix()
            for p in staged.rglob("*")
            if not p.is_dir() and len(p.relative_to(staged).parts) > 1
        ]
        self.claim(names, inside)
        self.changed = True
        install_entries(staged, self.path, names)

    def finish(self) -> None:
        """Remove the earlier run's files this run did not write again, then write the marker
        with complete=true: the last write of a finished output."""
        self.remove_own(self.pending - self.files, self.inside)
        self.pending = set()
        self._write_marker(complete=True)

    # -- marker and lock ----------------------------------------------------------------------
    def _write_marker(self, complete: bool) -> None:
        write_json(
            self.marker,
            {
                "verb": self.verb,
                "format_version": MARKER_FORMAT_VERSION,
                "qdiablo_version": __version__,
                "complete": complete,
                "files": sorted(self.files | self.pending),
                **({"inside": sorted(self.inside)} if self.inside else {}),
            },
        )

    def _lock(self) -> None:
        self._locked = acquire_lock(self.path, self.verb)

    def release(self) -> None:
        if self._locked:
            if held_count(self.path) <= 1:  # the outermost holder: forget what was changed
                _changed.discard(str(self.path.resolve()))
            release_lock(self.path)
            self._locked = False

    def _remove_leftovers(self) -> None:
        """Temporary folders of an interrupted save: their writer is gone (we hold the lock)."""
        for item in _leftovers(self.path):
            log.warning("removing %s, left by an interrupted save", item)
            remove_path(item)  # safe: a staging/atomic temporary of a dead writer
        parent = self.path.parent
        prefix = f".{self.path.name}."
        for item in parent.iterdir() if parent.is_dir() else ():
            if item.name.startswith(prefix) and _ATOMIC_TEMP.match(item.name):
                log.warning("removing %s, left by an interrupted save", item)
                remove_path(item)  # safe: the old whole-folder swap's temporary of this folder


def _leftovers(folder: Path) -> list[Path]:
    """Crash leftovers under `folder`, not descending into a subfolder another live process
    holds (a verb run by hand inside a pipeline's folder)."""
    found = []
    for item in folder.iterdir():
        if _is_leftover(item.name):
            found.append(item)
        elif item.is_dir() and not item.is_symlink():
            owner = read_lock(item / LOCK_NAME) if (item / LOCK_NAME).exists() else {}
            pid = owner.get("pid")
            if isinstance(pid, int) and pid != os.getpid() and process_alive(pid):
                continue
            found.extend(_leftovers(item))
    return found
