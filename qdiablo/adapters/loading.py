"""Reading a saved adapter back onto a loaded base: DiaBlo (qdiablo) or PEFT (LoRA and others)."""

from __future__ import annotations

from pathlib import Path

from qdiablo.adapters.lora import load_lora
from qdiablo.adapters.scales import load_trained_scales
from qdiablo.diablo import DiaBloModel
from qdiablo.diablo.model import ADAPTER_CONFIG_NAME
from qdiablo.errors import UserError
from qdiablo.health import NONFINITE_HINT, require_finite
from qdiablo.inputs import ADAPTER_VERBS, require_finished
from qdiablo.io import read_adapter_weights, read_json
from qdiablo.optional import import_peft


def adapter_kind(adapter_dir: str | Path) -> str:
    """'diablo' or 'lora' (any PEFT adapter), from the folder's adapter_config.json."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise UserError(f"adapter folder not found: {folder}")
    require_finished(folder, ADAPTER_VERBS, what="adapter")
    config = read_json(folder / ADAPTER_CONFIG_NAME, what="adapter config")
    if not isinstance(config, dict):
        raise UserError(f"{folder / ADAPTER_CONFIG_NAME}: expected a JSON object")
    if config.get("method") == "diablo":
        return "diablo"
    if config.get("peft_type"):
        return str(config["peft_type"]).lower()
    raise UserError(
        f"{folder / ADAPTER_CONFIG_NAME}: not a DiaBlo adapter (method: diablo) nor a PEFT adapter "
        "(peft_type)"
    )


def load_adapter(model, adapter_dir: str | Path, *, force: bool = False, merge: bool = False):
    """Attach a saved adapter to a loaded base: DiaBlo (qdiablo) or PEFT (LoRA and others).

    `merge=True` folds the adapter into the base's weights (`merge_and_unload`) for faster
    inference; on a quantized base the merged layers are dense. `force` skips DiaBlo's base
    fingerprint check. Scales trained with the adapter (`--train-scales`) are folded into the
    packed base's stored scales, after the fingerprint check (qdiablo.adapters.scales).
    """
    kind = adapter_kind(adapter_dir)
    if kind == "diablo":  # checks its tensors are finite itself
        wrapped = DiaBloModel.from_pretrained(model, adapter_dir, force=force)
    else:
        weights = Path(adapter_dir) / "adapter_model.safetensors"
        if weights.is_file():
            require_finite(
                read_adapter_weights(weights).items(), f"adapter {weights}", hint=NONFINITE_HINT
            )
        PeftModel = import_peft(what="a PEFT adapter").PeftModel
        if kind == "lora":  # re-registers the packed-layer dispatch GPTQ-LoRA was trained with
            wrapped = load_lora(model, str(adapter_dir))
        else:
            wrapped = PeftModel.from_pretrained(model, str(adapter_dir))
    load_trained_scales(wrapped, adapter_dir, fold=True)
    wrapped.eval()
    if merge:
        return wrapped.merge_and_unload()
    return wrapped
