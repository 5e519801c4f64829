"""One writer per folder: `.qdiablo.lock` holds the writer's pid and host.

A second writer is refused while the first lives; a lock whose process is gone (on this host) is
taken over. Re-entrant within a process (a verb holding a folder may call a library function that
holds it too).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from qdiablo.errors import UserError
from qdiablo.ownership import LOCK_NAME

log = logging.getLogger("qdiablo.outputs")


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
            owner = read_lock(path)
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
        try:
            with os.fdopen(fd, "w") as f:
                f.write(record + "\n")
        except OSError:  # a full disk: no half-written lock left behind
            path.unlink(missing_ok=True)
            raise
        _held[key] = 1
        return True
    raise UserError(f"{folder}: could not take {path}; another process keeps taking it")


def read_lock(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def held_count(folder: Path) -> int:
    """How many holders in this process hold `folder`'s lock (0: none)."""
    return _held.get(str((folder / LOCK_NAME).resolve()), 0)


def release_lock(folder: Path) -> None:
    path = folder / LOCK_NAME
    key = str(path.resolve())
    count = _held.get(key, 0)
    if count > 1:
        _held[key] = count - 1
        return
    _held.pop(key, None)
    if read_lock(path).get("pid") == os.getpid():
        path.unlink(missing_ok=True)
