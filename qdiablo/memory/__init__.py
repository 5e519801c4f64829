"""The memory planner (`qdiablo plan`): predicted host and device peaks of every verb from a
model's config.json, built on the meta device (docs/memory.md).

Names are imported lazily (a module `__getattr__`), so importing this package pulls in no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qdiablo.memory.plan import MemoryPlan, PlanSettings
    from qdiablo.memory.shapes import ModelShape, load_source

__all__ = ["MemoryPlan", "ModelShape", "PlanSettings", "load_source"]

_WHERE = {
    "MemoryPlan": "qdiablo.memory.plan",
    "PlanSettings": "qdiablo.memory.plan",
    "ModelShape": "qdiablo.memory.shapes",
    "load_source": "qdiablo.memory.shapes",
}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'qdiablo.memory' has no attribute {name!r}")
