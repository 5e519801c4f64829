"""The adapter registry: `--adapter` names → `AdapterMethod`s (qdiablo.adapters.method).

DiaBlo (`qdiablo.adapters.diablo`) and PEFT LoRA (`qdiablo.adapters.lora`) are built in; a new
method registers itself with `register_adapter(MyMethod())` (tests/test_adapter_registry.py
registers one from the test file alone). The names are known without importing torch, so the
CLI's flags can list them; the built-in methods are imported on first use.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qdiablo.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from qdiablo.adapters.method import AdapterMethod

BUILTIN = ("diablo", "lora")  # imported by _load_builtins; tests check the two lists agree
_METHODS: dict[str, AdapterMethod] = {}
_loaded = False


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        from qdiablo.adapters.diablo import DiaBloMethod
        from qdiablo.adapters.lora import LoraMethod

        for method in (DiaBloMethod(), LoraMethod()):
            _METHODS.setdefault(method.name, method)
        _loaded = True


def register_adapter(method: AdapterMethod, *, replace: bool = False) -> AdapterMethod:
    """Add an adapter method under `method.name` (`replace`: over an earlier one)."""
    _load_builtins()
    if method.name in _METHODS and not replace:
        raise ValueError(f"an adapter named {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def unregister_adapter(name: str) -> None:
    """Remove a registered method (a built-in one cannot be removed)."""
    if name in BUILTIN:
        raise ValueError(f"{name!r} is built in")
    _METHODS.pop(name, None)


def adapter_names() -> tuple[str, ...]:
    """Every registered name, built-ins first (without importing any method)."""
    return tuple(dict.fromkeys((*BUILTIN, *_METHODS)))


class AdapterChoices:
    """The registered names as a live sequence: a flag's `choices` that sees later
    registrations (argparse and TrainConfig's check read it when used, not when defined)."""

    def __iter__(self) -> Iterator[str]:
        return iter(adapter_names())

    def __contains__(self, name: object) -> bool:
        return name in adapter_names()

    def __len__(self) -> int:
        return len(adapter_names())

    def __repr__(self) -> str:
        return repr(adapter_names())


ADAPTER_CHOICES = AdapterChoices()


def get_adapter(name: str) -> AdapterMethod:
    """The method registered as `name`; a UserError naming the choices otherwise."""
    _load_builtins()
    if name not in _METHODS:
        raise UserError(f"unknown adapter {name!r}", hint=f"choose from {', '.join(_METHODS)}")
    return _METHODS[name]


def methods() -> list[AdapterMethod]:
    _load_builtins()
    return list(_METHODS.values())


def method_of(model: nn.Module) -> AdapterMethod:
    """The method whose model this is (DDP / accelerate wrappers are looked through)."""
    from torch import nn

    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    for method in methods():
        if method.owns(model):
            return method
    raise TypeError(f"{type(model).__name__} is no registered adapter's model")


def method_for_config(config: Mapping[str, Any], source: str | Path) -> tuple[AdapterMethod, str]:
    """The method that reads this adapter_config.json, and the kind it names."""
    for method in methods():
        kind = method.recognizes(config)
        if kind is not None:
            return method, kind
    known = ", ".join(m.name for m in methods())
    raise UserError(
        f"{source}: not a DiaBlo adapter (method: diablo) nor a PEFT adapter (peft_type), nor "
        f"any registered adapter's ({known})"
    )
