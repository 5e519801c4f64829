"""The quantizer registry: every method and every step around it declares here what it supports.

A method (RTN, GPTQ: `quantizers/methods/`) turns one weight matrix W [out, in] and its input
Hessian H into a `QuantResult` (codes, fp16-exact scales, integer zeros, `g_idx`); packing,
`QuantLinear`, the checkpoint layout, adapters and the export only ever see that result, so a
method is one module and one `register_method` call. Steps run around the method when the
config turns them on: `pre` steps change W before it (MagR), `post` steps refine its result
(coordinate descent), `block` steps run on the whole quantized block afterwards
(reconstruction). `QuantConfig` validation, `qdiablo quantize --method`, the base kinds, the
pipeline, FSDP loading and the export all read this registry, never a method's name.

This module imports nothing: the built-in declarations (quantizers/methods/, imported by the
`quantizers` package itself) load without torch, with `QuantConfig` (the CLI's flags); each hook
imports its algorithm when it first runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

ALL_BITS = (2, 3, 4, 8)
"""The bit widths the packed GPTQ layout stores (quantizers/packing.py)."""

STAGES = ("pre", "post", "block")


@dataclass(frozen=True)
class QuantMethod:
    """One quantizer: what it supports, and its hooks.

    `quantize(W, H, config, name) -> QuantResult` is the method itself (H is None when the run
    has no calibration data, which only a method with `needs_calibration=False` sees).
    `prepare(block, layers, H, config) -> H`, when set, runs before the layers that share one
    input are stacked and quantized: it may change those layers and the block around them in
    place (where AWQ folds its per-channel scales into the previous layer) and returns the
    Hessian of the inputs the changed layers now see."""

    name: str
    help: str
    quantize: Callable[..., Any]
    needs_calibration: bool = False
    bits: tuple[int, ...] = ALL_BITS
    group_sizes: tuple[int, ...] | None = None  # None: every group size the layout allows
    sym: tuple[bool, ...] = (False, True)  # the grids it writes: asymmetric, symmetric
    act_order: bool = False  # desc_act / static_groups (GPTQ's column order)
    prepare: Callable[..., Any] | None = None

    def check(self, config: Any) -> None:
        """A ValueError naming the first setting of `config` this method does not support."""
        where = f"QuantConfig: method {self.name!r}"
        if config.bits not in self.bits:
            raise ValueError(f"{where} supports bits {', '.join(map(str, self.bits))}")
        if self.group_sizes is not None and config.group_size not in self.group_sizes:
            sizes = ", ".join(map(str, self.group_sizes))
            raise ValueError(f"{where} supports group sizes {sizes}")
        if config.sym not in self.sym:
            raise ValueError(f"{where} writes only {'symmetric' if self.sym[0] else 'asymmetric'}")
        if not self.act_order and (config.desc_act or config.static_groups):
            users = " or ".join(repr(m.name) for m in methods() if m.act_order)
            raise ValueError(
                f"QuantConfig: desc_act and static_groups apply to method {users} only"
            )


@dataclass(frozen=True)
class QuantStep:
    """A step around the method, run when `enabled(config)`: `pre` steps
    `run(W, H, config) -> W'` before the method, `post` steps `run(W, result, H, config) ->
    result` after it (W: the original weights), `block` steps after a whole block is quantized
    (the block loop calls them: quantizers/quantize.py)."""

    name: str
    stage: str
    enabled: Callable[[Any], bool]
    needs_calibration: bool = True
    run: Callable[..., Any] | None = None


# Filled by quantizers/methods/ (the built-ins, imported with the `quantizers` package) and by
# whoever registers more.
_methods: dict[str, QuantMethod] = {}
_steps: dict[str, QuantStep] = {}


def register_method(method: QuantMethod, *, replace: bool = False) -> QuantMethod:
    """Add a quantizer; its name becomes a `--method` choice and a base kind."""
    if method.name in _methods and not replace:
        raise ValueError(f"quantizer {method.name!r} is already registered")
    if not set(method.bits) <= set(ALL_BITS):
        raise ValueError(f"quantizer {method.name!r}: the packed layout stores {ALL_BITS} bits")
    _methods[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a quantizer (tests that register one clean up with this)."""
    _methods.pop(name, None)


def register_step(step: QuantStep, *, replace: bool = False) -> QuantStep:
    """Add a step around the methods (see QuantStep)."""
    if step.stage not in STAGES:
        raise ValueError(f"step {step.name!r}: stage must be one of {', '.join(STAGES)}")
    if step.name in _steps and not replace:
        raise ValueError(f"quantization step {step.name!r} is already registered")
    _steps[step.name] = step
    return step


def methods() -> list[QuantMethod]:
    return list(_methods.values())


def method_names() -> tuple[str, ...]:
    return tuple(_methods)


def get_method(name: str) -> QuantMethod:
    """The registered method `name`; a ValueError listing the others when there is none."""
    method = _methods.get(name)
    if method is None:
        known = " or ".join(repr(m) for m in _methods)
        raise ValueError(f"QuantConfig.method: expected {known}, got {name!r}")
    return method


def steps(config: Any, stage: str) -> list[QuantStep]:
    """The steps of `stage` that `config` turns on, in registration order."""
    return [s for s in _steps.values() if s.stage == stage and s.enabled(config)]


def registered_steps(stage: str) -> list[QuantStep]:
    """Every step of `stage`, on or off, in registration order."""
    return [s for s in _steps.values() if s.stage == stage]


def calibration_users(config: Any, stages: Sequence[str] = STAGES) -> list[str]:
    """What in `config` cannot run without calibration data: the method and/or its steps."""
    users = [config.method] if get_method(config.method).needs_calibration else []
    return users + [s.name for stage in stages for s in steps(config, stage) if s.needs_calibration]


def needs_calibration(config: Any) -> bool:
    """Whether `config` cannot run without calibration data (RTN alone can)."""
    return bool(calibration_users(config))


class Names(Sequence[str]):
    """A tuple of names read from the registry each time it is used, so that a method registered
    after import (a plugin, a test) is a valid choice everywhere: `x in NAMES`, iteration and
    `", ".join(NAMES)` all see it."""

    def __init__(self, names: Callable[[], Sequence[str]]) -> None:
        self._names = names

    def __getitem__(self, i):  # type: ignore[override]
        return tuple(self._names())[i]

    def __len__(self) -> int:
        return len(tuple(self._names()))

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._names()))

    def __contains__(self, value: object) -> bool:
        return value in tuple(self._names())

    def __repr__(self) -> str:
        return repr(tuple(self._names()))


METHOD_NAMES = Names(method_names)
"""Every registered method's name, read live (QuantConfig's `--method` choices, base kinds)."""
