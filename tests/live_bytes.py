"""A measuring instrument for tests: the peak bytes of the tensors created while it is active,
tracked op by op on CPU (torch has no allocator statistics for the CPU)."""

from __future__ import annotations

import torch
from torch._library.custom_ops import OPDEFS
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors created while it is active (views of existing
    storages, such as the model's parameters, are not new memory). qdiablo's custom ops are
    looked into: their bodies run under the mode, so their transients count."""

    def __init__(self, model):
        super().__init__()
        tensors = [*model.parameters(), *model.buffers()]
        self.known = {t.untyped_storage().data_ptr() for t in tensors}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "qdiablo":
            with self:
                return OPDEFS[func.name()]._init_fn(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        for ptr in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[ptr]
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if storage.nbytes() and ptr not in self.live and ptr not in self.known:
                    self.live[ptr] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out
