"""Non-finite weights are refused where they enter: an adapter or a base is checked on load.

A diverged training run once saved an adapter whose every value was NaN; evaluation then failed
on each rerun and a merged export shipped NaN weights under a card that looked fine. Loading
(`qdiablo.models`, `qdiablo.adapters.loading`, the DiaBlo loader) and merging check every float
tensor here and name the first one holding NaN or inf.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from qdiablo.errors import UserError

NONFINITE_HINT = "the training run that saved it diverged: train it again (e.g. with a lower --lr)"


def _local(t: torch.Tensor) -> torch.Tensor:
    """A tensor's own data (an FSDP DTensor's local shard)."""
    return t.to_local() if hasattr(t, "to_local") else t


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, int] | None:
    """(name, count of non-finite values) of the first float tensor that has any, or None."""
    for name, tensor in named:
        t = _local(tensor.detach() if isinstance(tensor, torch.Tensor) else tensor)
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.is_meta:
            continue
        if not bool(torch.isfinite(t).all()):
            return name, int((~torch.isfinite(t)).sum())
    return None


def require_finite(named: Iterable[tuple[str, torch.Tensor]], where: str, hint: str) -> None:
    """Refuse when a float tensor holds NaN or inf: one line naming `where` and the tensor."""
    bad = first_nonfinite(named)
    if bad is not None:
        name, count = bad
        raise UserError(
            f"{where}: tensor '{name}' holds {count:,} non-finite value(s) (NaN or inf)",
            hint=hint,
        )


PACKED_NAMES = ("qweight", "qzeros", "g_idx")  # integer codes, whatever dtype holds the bytes


def model_tensors(model: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """A model's float values by name (each shared tensor once), packed integer codes aside:
    a QuantLinear's qweight/qzeros/g_idx and bitsandbytes' packed 4-bit weights may be held in
    a float dtype (`packed_storage`, `quant_storage`) whose bit patterns are not numbers."""
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        packed = callable(getattr(module, "packed_tensors", None))
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, t in own:
            if t is None or id(t) in seen or type(t).__name__ == "Params4bit":
                continue
            if packed and name in PACKED_NAMES:
                continue
            seen.add(id(t))
            yield f"{prefix}.{name}" if prefix else name, t
