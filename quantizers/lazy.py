"""A model run without its decoder blocks resident: `streamed_logits` loads each block in turn
(e.g. from the checkpoint's shards), runs it on the device and releases it, while the
embeddings and head stay where they are (export's merge report); `blocks_standing_aside` lets
the model's own embeddings, final norm and head run around hidden states that were computed
block by block elsewhere (the end-to-end stage's teacher, quantizers/e2e.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from quantizers.calibration import block_output, find_decoder_blocks, to_device


class _StandInBase(nn.Module):
    """A module put in a decoder block's place for one forward; attributes it lacks (e.g.
    attention_type, which the model reads from each block) are the original block's."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_original", original)  # not a submodule: no weights here

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)


class _LazyBlock(_StandInBase):
    """Stands in for decoder block i during one forward: loads it, runs it on its device, and
    hands it to `unload`."""

    def __init__(self, blocks: nn.ModuleList, i: int, load, device, unload) -> None:
        super().__init__(blocks[i])
        object.__setattr__(self, "_blocks", blocks)  # the model's list, not a submodule
        self._i, self._load, self._device, self._unload = i, load, device, unload

    def forward(self, hidden, *args, **kwargs):
        # The original back in its place while it runs: a `load` that fills the model's own
        # block (qdiablo.streamed) finds it there, not this stand-in.
        self._blocks[self._i] = self._original
        try:
            block = self._load(self._i, self._device)
            args, kwargs = to_device((args, kwargs), self._device)
            out = block(hidden.to(self._device), *args, **kwargs)
            if self._unload is not None:
                self._unload(self._i, block)
        finally:
            self._blocks[self._i] = self
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
    for i in range(len(originals)):
        blocks[i] = _LazyBlock(blocks, i, load_block, device, unload)
    try:
        return model(input_ids=input_ids, use_cache=False).logits
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


class _StandIn(_StandInBase):
    """In place of a decoder block during one forward: returns `value` (the hidden states after
    the last block, for the first stand-in) or its input unchanged, in the block's return type."""

    def __init__(self, original: nn.Module, value: torch.Tensor | None, as_tuple: bool) -> None:
        super().__init__(original)
        self._value, self._as_tuple = value, as_tuple

    def forward(self, hidden, *args, **kwargs):
        h = hidden if self._value is None else self._value.to(hidden.device, hidden.dtype)
        return (h,) if self._as_tuple else h


@contextlib.contextmanager
def blocks_standing_aside(
    blocks: nn.ModuleList, final_hidden: torch.Tensor, as_tuple: bool = False
) -> Iterator[None]:
    """During the `with`, the model's forward skips its decoder blocks: the first returns
    `final_hidden` (the last block's output, computed elsewhere) and the rest pass it on."""
    originals = list(blocks)
    for i, block in enumerate(originals):
        blocks[i] = _StandIn(block, final_hidden if i == 0 else None, as_tuple)
    try:
        yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
