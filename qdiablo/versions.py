"""The library versions a run or an export records, so that a result can be reproduced."""

from __future__ import annotations

import importlib.metadata
import platform

from qdiablo import __version__

# Always present (dependencies of qdiablo), then optional extras that are recorded if installed.
REQUIRED = ("torch", "transformers", "safetensors", "accelerate")
OPTIONAL = ("peft", "bitsandbytes")


def library_versions() -> dict[str, str]:
    """qdiablo's, Python's and each installed library's version, by name."""
    out = {"qdiablo": __version__, "python": platform.python_version()}
    for name in REQUIRED + OPTIONAL:
        try:  # the installed distribution's version: importing bitsandbytes has side effects
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name in REQUIRED:
                raise
    return out
