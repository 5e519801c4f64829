"""The optional libraries of the `qlora` extra (PEFT, bitsandbytes), imported in one place so that
a local run never reaches the network for them.

bitsandbytes 0.50, when imported on a CPU with AVX512-BF16, asks the Hugging Face hub for a CPU
kernel (`kernels-community/quantization-bitsandbytes`, through the `kernels` package) and logs
"Failed to load CPU gemm_4bit_forward ..." when the hub refuses or cannot be reached. PEFT imports
bitsandbytes whenever it is installed, and so does transformers' Trainer through PEFT. qdiablo
hides `kernels` while bitsandbytes imports: no request is made, no warning is printed, and
bitsandbytes keeps its own bundled CPU code (the hub kernel is only a faster bf16 GEMV).

Code that merely asks "is this a PEFT model / a bitsandbytes layer?" uses `loaded(...)`: a module
that was never imported cannot have built the object in hand.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import sys
from collections.abc import Iterator
from types import ModuleType

from qdiablo.errors import UserError

INSTALL_HINT = 'pip install -e ".[qlora]"'
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_HUB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward"


class _DropHubKernelWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_HUB_KERNEL_WARNING)


@contextlib.contextmanager
def no_hub_kernels() -> Iterator[None]:
    """While bitsandbytes is first imported: `kernels` cannot be imported, and its warning is
    dropped. A no-op once bitsandbytes is loaded."""
    if "bitsandbytes" in sys.modules:
        yield
        return
    # transformers decides at import whether its hub-kernel layer works: let it see `kernels`
    with contextlib.suppress(ImportError):
        importlib.import_module("transformers.integrations.hub_kernels")
    saved = {k: v for k, v in sys.modules.items() if k == "kernels" or k.startswith("kernels.")}
    for name in saved:
        del sys.modules[name]
    sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ImportError
    logger, quiet = logging.getLogger(_BNB_CPU_LOGGER), _DropHubKernelWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        del sys.modules["kernels"]
        sys.modules.update(saved)
        logger.removeFilter(quiet)
        _forget_kernel_checks()


def _forget_kernel_checks() -> None:
    """transformers caches whether `kernels` is importable (an lru_cache); a check made while it
    was hidden here must not outlive the hiding, or from_pretrained, which wants hub kernels by
    default in transformers 5, finds them "not available" and refuses to load a model."""
    utils = sys.modules.get("transformers.utils.import_utils")
    check = getattr(utils, "is_kernels_available", None)
    if callable(getattr(check, "cache_clear", None)):
        check.cache_clear()


def _import(name: str, what: str) -> ModuleType:
    with no_hub_kernels():
        try:
            return importlib.import_module(name)
        except ImportError as e:
            raise UserError(f"{what} needs {name.split('.')[0]}", hint=INSTALL_HINT) from e


def import_peft(module: str = "peft", what: str = "a LoRA adapter") -> ModuleType:
    """`peft` (or one of its modules), imported without reaching the hub; a UserError if the
    qlora extra is missing."""
    return _import(module, what)


def import_bitsandbytes(module: str = "bitsandbytes", what: str = "an NF4 base") -> ModuleType:
    """`bitsandbytes` (or one of its modules), imported without reaching the hub."""
    return _import(module, what)


def prepare_trainer_imports() -> None:
    """transformers' Trainer imports PEFT when it is installed (and PEFT bitsandbytes): import
    them here first, quietly, if they are installed; nothing if they are not."""
    if importlib.util.find_spec("peft") is not None:
        with contextlib.suppress(UserError):
            import_peft()


def loaded(name: str) -> ModuleType | None:
    """The module if some code has imported it already, else None (never imports it)."""
    return sys.modules.get(name)
