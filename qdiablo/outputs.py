"""One rule for every verb's output folder: never delete what the verb did not write.

    with OutputFolder("runs/q2", "quantize", overwrite=args.overwrite) as out:
        out.claim(["model.safetensors", ...])   # before writing them
        ...                                     # write
        out.finish()                            # the completion marker, written last

- A folder holding anything the verb did not write is refused unless `overwrite`; then only
  the verb's own files go (the names its marker lists, and the names it claims), never others.
- The verb's marker `.qdiablo-<verb>.json` lists the names it wrote and, once `finish()` ran,
  `"complete": true`: a folder without it is unfinished.
- `.qdiablo.lock` holds the writer's pid: a second writer is refused; a lock whose process is
  gone is taken over, and the temporary folders that process left behind are removed.
- The current folder (or one above it) is refused as an output: its files are the user's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qdiablo import __version__
from qdiablo.errors import UserError
from qdiablo.io import write_json
from quantizers.fileio import STAGING_PREFIX, install_entries

log = logging.getLogger(__name__)

LOCK_NAME = ".qdiablo.lock"
MARKER_FORMAT_VERSION = 1
# tempfile.mkdtemp names of atomic writes (qdiablo.io.atomic_path): .NAME.XXXXXXXX.tmp / .old
_ATOMIC_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.(tmp|old)$")


def marker_name(verb: str) -> str:
    return f".qdiablo-{verb}.json"


def is_bookkeeping(name: str) -> bool:
    """A lock, a marker or a staging folder: not part of what a verb outputs."""
    return name == LOCK_NAME or (name.startswith(".qdiablo-") and name.endswith(".json"))


def _is_leftover(name: str) -> bool:
    return name.startswith(STAGING_PREFIX) or bool(_ATOMIC_TEMP.match(name))


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, killed but not yet reaped, counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


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


def remove_entry(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class OutputFolder:
    """An output folder held by one verb run (see the module docstring).

    `resumable`: keep the files of an earlier unfinished or finished run of the same verb
    (train, eval resume from them); otherwise they are replaced by this run's files and the ones
    this run does not write again are removed at `finish()`.
    `replace_own`: whether a finished earlier output of the same verb may be replaced without
    `overwrite` (quantize: yes, as before; export: no).
    `known`: the names this verb writes, removed by `overwrite` even in a folder without a
    marker (written by an older qdiablo); they still count as foreign without `overwrite`,
    unless the folder holds `signature` (e.g. train_config.json), which only this verb writes.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        verb: str,
        *,
        overwrite: bool = False,
        resumable: bool = False,
        replace_own: bool = True,
        known: Iterable[str] = (),
        flag: str = "--output",
        lock: bool = True,
        signature: str | None = None,
    ):
        self.path = Path(path)
        self.verb = verb
        self.overwrite = overwrite
        self.resumable = resumable
        self.replace_own = replace_own
        self.known = set(known)
        self.flag = flag
        self.use_lock = lock
        self.signature = signature
        self.previous: dict[str, Any] | None = None
        self.files: set[str] = set()  # claimed by this run
        self.pending: set[str] = set()  # an earlier output's, removed at finish unless claimed
        self._locked = False
        self._created = False

    # -- opening ----------------------------------------------------------------------------
    def __enter__(self) -> OutputFolder:
        self.open()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            refused = issubclass(exc_type, UserError)  # checks run before writes: nothing new
            if refused and self.previous is not None and self.marker.exists():
                write_json(self.marker, self.previous)  # a finished run stays marked finished
            else:
                self._undo_if_untouched()
        self.release()

    def _undo_if_untouched(self) -> None:
        """A run that failed before writing anything leaves the folder as it found it."""
        if self.entries() & self.files:
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
                        remove_entry(item)
                self.path.rmdir()

    @property
    def marker(self) -> Path:
        return self.path / marker_name(self.verb)

    def open(self) -> OutputFolder:
        check_not_current_folder(self.path, self.flag)
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.flag} {self.path} exists and is not a folder")
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        if self.use_lock:
            self._lock()
        try:
            self._remove_leftovers()
            self.previous = self._read_marker()
            owned = set(self.previous["files"]) if self.previous else set()
            if self.previous is None and self.signature and (self.path / self.signature).exists():
                owned = self.known & self.entries()  # written before markers existed: adopted
            foreign = sorted(self.entries() - owned)
            if foreign and not self.overwrite:
                shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
                raise UserError(
                    f"{self.flag} {self.path} holds files `qdiablo {self.verb}` did not write "
                    f"({shown})",
                    hint=f"choose another {self.flag}, or pass --overwrite (it replaces only "
                    f"{self.verb}'s own files and keeps these)",
                )
            finished = bool(self.previous and self.previous.get("complete"))
            if finished and not self.resumable and not self.replace_own and not self.overwrite:
                raise UserError(
                    f"{self.flag} {self.path} already holds a finished `qdiablo {self.verb}` "
                    "output",
                    hint="pass --overwrite to replace it, or choose another folder",
                )
            if self.resumable:
                if self.overwrite:  # train/eval write as they go: start from a clean slate
                    self.remove_own(owned | (self.known & self.entries()))
                    owned = set()
                self.files = set(owned)
            else:  # the earlier output stays whole until this one is installed (finish)
                self.pending = owned | (self.known & self.entries() if self.overwrite else set())
            self._write_marker(complete=False)
        except BaseException:
            if self._created:
                self._undo_if_untouched()
            self.release()
            raise
        return self

    def entries(self) -> set[str]:
        """Top-level names in the folder, bookkeeping and crash leftovers aside."""
        return {
            p.name
            for p in self.path.iterdir()
            if not is_bookkeeping(p.name) and not _is_leftover(p.name)
        }

    def remove_own(self, names: Iterable[str]) -> None:
        for name in sorted(names):
            if "/" in name or name in ("", ".", "..") or is_bookkeeping(name):
                continue
            target = self.path / name
            if target.exists() or target.is_symlink():
                log.info("removing %s (written by an earlier `qdiablo %s`)", target, self.verb)
                remove_entry(target)

    # -- writing ----------------------------------------------------------------------------
    def claim(self, names: Iterable[str]) -> None:
        """Record top-level names as this verb's before writing them (crash-safe ownership)."""
        new = {str(n) for n in names} - self.files
        if new:
            self.files |= new
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
        """Move every entry of a staging folder into the output (claiming it first), replacing
        same-named entries only; the staging folder is removed."""
        names = sorted(p.name for p in staged.iterdir())
        self.claim(names)
        install_entries(staged, self.path, names)

    def finish(self) -> None:
        """Remove the earlier run's files this run did not write again, then write the marker
        with complete=true: the last write of a finished output."""
        self.remove_own(self.pending - self.files)
        self.pending = set()
        self._write_marker(complete=True)

    # -- marker and lock ----------------------------------------------------------------------
    def _read_marker(self) -> dict[str, Any] | None:
        if not self.marker.is_file():
            return None
        try:
            data = json.loads(self.marker.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s: unreadable marker, treated as absent", self.marker)
            return None
        if not isinstance(data, dict) or not isinstance(data.get("files"), list):
            return None
        return data

    def _write_marker(self, complete: bool) -> None:
        write_json(
            self.marker,
            {
                "verb": self.verb,
                "format_version": MARKER_FORMAT_VERSION,
                "qdiablo_version": __version__,
                "complete": complete,
                "files": sorted(self.files | self.pending),
            },
        )

    def _lock(self) -> None:
        self._locked = acquire_lock(self.path, self.verb)

    def release(self) -> None:
        if self._locked:
            release_lock(self.path)
            self._locked = False

    def _remove_leftovers(self) -> None:
        """Temporary folders of an interrupted save: their writer is gone (we hold the lock)."""
        for item in _leftovers(self.path):
            log.warning("removing %s, left by an interrupted save", item)
            remove_entry(item)
        parent = self.path.parent
        prefix = f".{self.path.name}."
        for item in parent.iterdir() if parent.is_dir() else ():
            if item.name.startswith(prefix) and _ATOMIC_TEMP.match(item.name):
                log.warning("removing %s, left by an interrupted save", item)
                remove_entry(item)


def _leftovers(folder: Path) -> list[Path]:
    """Crash leftovers under `folder`, not descending into a subfolder another live process
    holds (a verb run by hand inside a pipeline's folder)."""
    found = []
    for item in folder.iterdir():
        if _is_leftover(item.name):
            found.append(item)
        elif item.is_dir() and not item.is_symlink():
            owner = _read_lock(item / LOCK_NAME) if (item / LOCK_NAME).exists() else {}
            pid = owner.get("pid")
            if isinstance(pid, int) and pid != os.getpid() and process_alive(pid):
                continue
            found.extend(_leftovers(item))
    return found


_held: dict[str, int] = {}


def acquire_lock(folder: Path, verb: str) -> bool:
    """Take `folder/.qdiablo.lock`; re-entrant within a process. Refuses a live other owner.

    Why not `filelock`: the lock file must say who holds it (pid, host, verb) for the refusal
    message, and a lock left by a dead process is how an interrupted writer is recognised (its
    staging folders are then removed); an flock is released silently when its holder dies."""
    path = folder / LOCK_NAME
    key = str(path.resolve())
    if _held.get(key):
        _held[key] += 1
        return True
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "verb": verb})
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            owner = _read_lock(path)
            pid = int(owner.get("pid", -1)) if isinstance(owner.get("pid"), int) else -1
            same_host = owner.get("host", socket.gethostname()) == socket.gethostname()
            if owner and pid != os.getpid() and (process_alive(pid) or not same_host):
                raise UserError(
                    f"{folder} is in use by process {pid} (`qdiablo {owner.get('verb', '?')}`"
                    f"{'' if same_host else ' on ' + str(owner.get('host'))})",
                    hint=f"wait for it to finish, or remove {path} if that process is gone",
                ) from None
            log.warning("%s: taking over the lock of process %s, which is gone", folder, pid)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(record + "\n")
        _held[key] = 1
        return True
    raise UserError(f"{folder}: could not take {path}; another process keeps taking it")


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def release_lock(folder: Path) -> None:
    path = folder / LOCK_NAME
    key = str(path.resolve())
    count = _held.get(key, 0)
    if count > 1:
        _held[key] = count - 1
        return
    _held.pop(key, None)
    if _read_lock(path).get("pid") == os.getpid():
        path.unlink(missing_ok=True)
