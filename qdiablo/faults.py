"""Operating-system faults as one line that names the path and says what to do.

A full disk, a file-size limit (`ulimit -f`), a read-only or foreign-owned folder, or a path too
long is the machine's state, not a bug in qdiablo: the verb stops with a `UserError`, and since
every write is atomic and a verb's marker stays `"complete": false` until its last write, nothing
finished is lost and the same command can be run again once the cause is gone.

torch.save and safetensors report a failed write in their message only (torch: `unexpected pos`,
with no errno; safetensors: `... (os error 28)`), so `fault_errno` reads those too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import shutil
from collections.abc import Iterator
from pathlib import Path

from qdiablo.errors import UserError

_AGAIN = "then run the same command again (nothing finished was lost)"
# errno -> (what happened, what to do)
FAULTS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", f"free some space or use another disk, {_AGAIN}"),
    errno.EDQUOT: ("disk quota exceeded", f"free some space or use another disk, {_AGAIN}"),
    errno.EFBIG: (
        "file too large for this process's file-size limit (ulimit -f)",
        f"raise the limit (ulimit -f unlimited), {_AGAIN}",
    ),
    errno.EACCES: (
        "permission denied",
        "choose a folder you can write to (or read, for an input), or change its permissions",
    ),
    errno.EPERM: (
        "operation not permitted",
        "choose a folder you can write to, or change its permissions",
    ),
    errno.EROFS: ("read-only file system", "choose a folder on a writable disk"),
    errno.ENAMETOOLONG: (
        "path too long (a name may have at most 255 bytes, a path 4096)",
        "choose a shorter path",
    ),
}
# Writers that report a failed write without an errno.
_NO_ERRNO_WRITE = re.compile(
    r"unexpected pos|PytorchStreamWriter failed|file write failed|iostream error"
)
_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")


def fault_errno(error: BaseException) -> int | None:
    """The errno of an operating-system fault, also where only the message carries it; None for
    anything else."""
    if isinstance(error, OSError) and error.errno:
        return error.errno
    if not isinstance(error, RuntimeError | ValueError) and type(error).__name__ != (
        "SafetensorError"
    ):
        return None
    text = str(error)
    match = _ERRNO_IN_TEXT.search(text)
    if match:
        return int(match.group(1) or match.group(2))
    if _NO_ERRNO_WRITE.search(text):  # torch.save: a short write, cause not said
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        return errno.EFBIG if soft != resource.RLIM_INFINITY else errno.ENOSPC
    return None


def _free_space(path: Path) -> str:
    """`, N MiB free` on the disk holding `path` (its nearest existing ancestor), or ''."""
    for folder in [path, *path.parents]:
        if folder.exists():
            with contextlib.suppress(OSError):
                return f" ({shutil.disk_usage(folder).free / 2**20:.0f} MiB free there)"
            break
    return ""


def as_user_error(error: BaseException, path: str | os.PathLike | None = None) -> UserError | None:
    """The one-line UserError for an operating-system fault (None when `error` is not one).

    The path named is the error's own file name when it has one, else `path` (what was being
    written)."""
    code = fault_errno(error)
    if code not in FAULTS:
        return None
    what, hint = FAULTS[code]
    where = getattr(error, "filename", None) or path
    if where is None:
        return UserError(f"writing failed: {what}", hint=hint)
    if code == errno.ENOSPC:
        what += _free_space(Path(where))
    return UserError(f"{where}: {what}", hint=hint)


@contextlib.contextmanager
def guard(path: str | os.PathLike) -> Iterator[None]:
    """Turn an operating-system fault inside the block into a UserError naming `path` (or the
    file the error names); anything else passes unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        error = as_user_error(e, path)
        if error is None:
            raise
        raise error from e
