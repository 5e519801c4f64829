"""Exporting an adapter trained with `--train-scales`: the trained scales go into the base.

The export's base/ is the quantized base with each packed layer's stored fp16 scales replaced by
the trained ones (fp16(s₀·m), exactly what training computed with), so GPTQModel and any other
reader of the GPTQ layout get them with no extra file; only the `.scales` tensors of the weight
files change, every other byte is the base's. The exported adapter/ no longer carries
trained_scales.safetensors (they are in the base now), and a DiaBlo adapter's base fingerprint
is recomputed on the new base, so that `load_exported` (and its fingerprint check) loads it as an
ordinary adapter and computes what the trained model computed, bit for bit.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from qdiablo.adapters.registry import method_of
from qdiablo.adapters.scales import SCALES_FILE, bare_model
from quantizers.trained_scales import packed_layers

log = logging.getLogger(__name__)


def fold_into_base_copy(model: nn.Module, target: Path) -> int:
    """In `target`, a copy of the base's files, replace the packed layers' `.scales` by the
    (already folded) scales of `model`'s layers. Returns the tensors replaced."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    scales = {
        f"{name}.scales": layer.packed_tensors().scales.detach().cpu().contiguous()
        for name, layer in packed_layers(bare_model(model)).items()
    }
    replaced = 0
    for file in sorted(target.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        hits = [k for k in tensors if k in scales]
        if not hits:
            continue
        for key in hits:
            if tensors[key].shape != scales[key].shape or tensors[key].dtype != scales[key].dtype:
                raise ValueError(f"{file}: {key} does not match the packed layer's scales")
            tensors[key] = scales[key]
        replaced += len(hits)
        save_file(tensors, file, metadata=meta)
    if replaced != len(scales):
        raise ValueError(f"{target}: found {replaced} of the {len(scales)} packed layers' scales")
    log.info("base/: %d packed layers carry the trained scales", replaced)
    return replaced


def drop_scales_from_adapter_copy(model: nn.Module, target: Path) -> None:
    """In `target`, a copy of the adapter's files, remove the trained scales (if copied); an
    adapter's base fingerprint (DiaBlo's) becomes that of the base with the scales folded in
    (`model` holds it)."""
    (target / SCALES_FILE).unlink(missing_ok=True)
    method_of(model).refresh_fingerprint(model, target)
