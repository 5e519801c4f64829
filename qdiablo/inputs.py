"""What a verb reads: never written into, and never loaded while unfinished.

- `check_apart(output, inputs)`: an `--output` that equals, contains or lies inside one of the
  verb's inputs is refused before anything is written (symlinks resolved). Writing into an input
  can copy a folder into itself (an export into its own base grew without end) or replace the
  file being read.
- `require_finished(folder, verbs)`: a folder whose marker (`.qdiablo-<verb>.json`, in the folder
  or, for a part such as `train/adapter/`, in its parent) says `"complete": false` was left by an
  interrupted verb: loading it is refused with one line naming that verb and how to finish it.
  A folder without a marker (another tool's, or an older qdiablo's) loads as before.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from qdiablo.errors import UserError
from qdiablo.ownership import read_marker

# How to finish each verb's interrupted output.
FINISH = {
    "quantize": "run the same `qdiablo quantize` command again (same --output) to finish it",
    "train": "finish it with the same `qdiablo train` command plus --resume auto",
    "eval": "run the same `qdiablo eval` command again: it resumes from its finished items",
    "export": "run the same `qdiablo export` command again to finish it",
}
MODEL_VERBS = ("quantize", "export")  # folders loaded as a model (or its tokenizer)
ADAPTER_VERBS = ("train", "export")  # parents of an adapter/ folder


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def check_apart(
    output: str | os.PathLike,
    inputs: Mapping[str, str | os.PathLike | Iterable[str | os.PathLike] | None],
    flag: str = "--output",
) -> None:
    """Refuse an output that equals, contains or lies inside an input. `inputs` maps a flag to
    a path or paths; values that are not existing local paths (hub ids, 'smollm2') are skipped."""
    out = _resolved(output)
    for name, value in inputs.items():
        values = [value] if isinstance(value, str | os.PathLike) else list(value or [])
        for item in values:
            if item is None or not Path(item).expanduser().exists():
                continue
            src = _resolved(item)
            if out == src:
                relation = "is"
            elif src in out.parents:
                relation = "lies inside"
            elif out in src.parents:
                relation = "contains"
            else:
                continue
            raise UserError(
                f"{flag} {output} {relation} the input {name} {item}: a verb never writes into "
                "its own inputs",
                hint=f"choose a {flag} outside {item}",
            )


def unfinished(folder: str | os.PathLike, verbs: Iterable[str]) -> str | None:
    """The verb whose marker says `folder` is unfinished (its own marker, or its parent's when
    that lists the folder), or None."""
    path = Path(folder)
    for verb in verbs:
        own = read_marker(path, verb) if path.is_dir() else None
        if own is not None and own.get("complete") is not True:
            return verb
        parent = read_marker(path.parent, verb) if path.parent.is_dir() else None
        listed = parent is not None and path.name in parent["files"]
        if listed and parent.get("complete") is not True:
            return verb
    return None


def require_finished(folder: str | os.PathLike, verbs: Iterable[str], what: str = "") -> None:
    """Refuse a folder left unfinished by one of `verbs` (see the module docstring)."""
    verb = unfinished(folder, verbs)
    if verb is None:
        return
    path = Path(folder)
    where = path if read_marker(path, verb) is not None else path.parent
    raise UserError(
        f"{what + ' ' if what else ''}{folder} is unfinished: `qdiablo {verb}` was interrupted "
        f"while writing {where} (its marker says complete: false)",
        hint=FINISH.get(verb, f"run the same `qdiablo {verb}` command again to finish it"),
    )
