"""Reading a saved adapter back onto a loaded base, whichever registered method wrote it."""

from __future__ import annotations

from pathlib import Path

from qdiablo.adapters.method import AdapterMethod
from qdiablo.adapters.registry import method_for_config
from qdiablo.adapters.scales import load_trained_scales
from qdiablo.diablo.model import ADAPTER_CONFIG_NAME
from qdiablo.errors import UserError
from qdiablo.inputs import ADAPTER_VERBS, require_finished
from qdiablo.io import read_json


def adapter_method(adapter_dir: str | Path) -> tuple[AdapterMethod, str]:
    """The method that reads this folder, and the kind its adapter_config.json names ('diablo',
    or a PEFT type such as 'lora')."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise UserError(f"adapter folder not found: {folder}")
    require_finished(folder, ADAPTER_VERBS, what="adapter")
    config = read_json(folder / ADAPTER_CONFIG_NAME, what="adapter config")
    if not isinstance(config, dict):
        raise UserError(f"{folder / ADAPTER_CONFIG_NAME}: expected a JSON object")
    return method_for_config(config, folder / ADAPTER_CONFIG_NAME)


def adapter_kind(adapter_dir: str | Path) -> str:
    """'diablo' or 'lora' (any PEFT adapter: its type), from the folder's adapter_config.json."""
    return adapter_method(adapter_dir)[1]


def load_adapter(model, adapter_dir: str | Path, *, force: bool = False, merge: bool = False):
    """Attach a saved adapter to a loaded base: DiaBlo (qdiablo), PEFT (LoRA and others) or
    another registered method.

    `merge=True` folds the adapter into the base's weights (`merge_and_unload`) for faster
    inference; on a quantized base the merged layers are dense. `force` skips DiaBlo's base
    fingerprint check. Scales trained with the adapter (`--train-scales`) are folded into the
    packed base's stored scales, after the fingerprint check (qdiablo.adapters.scales).
    """
    method, kind = adapter_method(adapter_dir)
    wrapped = method.load(model, Path(adapter_dir), kind, force=force)
    load_trained_scales(wrapped, adapter_dir, fold=True)
    wrapped.eval()
    if merge:
        return wrapped.merge_and_unload()
    return wrapped
