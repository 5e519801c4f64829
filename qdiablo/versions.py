"""The library versions a run or an export records, so that a result can be reproduced."""

from __future__ import annotations

import importlib
import platform

from qdiablo import __version__

# Always present (dependencies of qdiablo), then optional extras that are recorded if installed.
REQUIRED = ("torch", "transformers", "safetensors", "accelerate")
OPTIONAL = ("peft", "bitsandbytes")


def library_versions() -> dict[str, str]:
    """qdiablo's, Python's and each installed library's version, by name."""
    out = {"qdiablo": __version__, "python": platform.python_version()}
    for name in REQUIRED + OPTIONAL:
        try:
            # deferred: these are imported already wherever a run or an export records them
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            if name in REQUIRED:
                raise
    return out
