"""A model run with its decoder blocks loaded one at a time: each block is read (e.g. from the
checkpoint's shards), run on the device and released, while the embeddings and head stay where
they are. Used where a full-precision model that is never whole in memory must still produce
logits: the end-to-end stage's teacher (quantizers/e2e.py) and export's merge report.
"""

from __future__ import annotations

import torch
from torch import nn

from quantizers.calibration import block_output, find_decoder_blocks, to_device


class _LazyBlock(nn.Module):
    """Stands in for decoder block i during one forward: loads it, runs it on its device, and
    hands it to `unload`; other attributes (e.g. attention_type) are the original block's."""

    def __init__(self, original: nn.Module, i: int, load, device, unload) -> None:
        super().__init__()
        object.__setattr__(self, "_original", original)  # not a submodule: no weights here
        self._i, self._load, self._device, self._unload = i, load, device, unload

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, hidden, *args, **kwargs):
        block = self._load(self._i, self._device)
        args, kwargs = to_device((args, kwargs), self._device)
        out = block(hidden.to(self._device), *args, **kwargs)
        if self._unload is not None:
            self._unload(self._i, block)
        first = block_output(out).to(hidden.device)
        return first if isinstance(out, torch.Tensor) else (first, *out[1:])


@torch.no_grad()
def streamed_logits(
    model: nn.Module,
    load_block,
    input_ids: torch.Tensor,
    device: torch.device | str = "cpu",
    unload=None,
) -> torch.Tensor:
    """`model(input_ids).logits` with each decoder block from `load_block(i, device)` in turn
    (run on `device`, then given to `unload(i, block)` if set): the embeddings and head run
    where they are, and only one block is loaded at a time."""
    _, blocks = find_decoder_blocks(model)
    originals = list(blocks)
    device = torch.device(device)
    for i, block in enumerate(originals):
        blocks[i] = _LazyBlock(block, i, load_block, device, unload)
    try:
        return model(input_ids=input_ids, use_cache=False).logits
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
