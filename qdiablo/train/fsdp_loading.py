"""Sharded loading of a packed base under FSDP2: no process ever holds the whole base.

1. `qdiablo.models.packed_base_on_meta`: the model of a `qdiablo quantize` folder is built on
   the meta device (QuantLinear layers included), nothing read but the headers;
2. the adapter is attached on meta as usual; DiaBlo's base fingerprint is computed from the files,
   reading only the rows it samples, so it equals the fingerprint of a normally loaded base;
3. `shard_and_load`: accelerate's own `fsdp2_prepare_model` shards the meta model (one unit per
   decoder block), `to_empty` gives each process room for its shards only, and each parameter's
   rows are read from the safetensors files with `get_slice` (packed bytes viewed as the storage
   dtype; float weights cast to the run's dtype). Adapter parameters start from their method's
   `initial_value` (qdiablo.adapters.method): DiaBlo blocks and LoRA B at zero, LoRA A from a
   generator seeded per layer (so the same at any world size, but not the same draw as a
   non-FSDP run).
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import torch
from torch import nn

from qdiablo.adapters.registry import method_of
from qdiablo.errors import UserError
from quantizers.packing import zeros_v1_to_v2
from quantizers.quant_linear import PACKED_NAMES, QuantLinear

log = logging.getLogger(__name__)


class _Reader:
    """Opens each safetensors file once; reads whole tensors or row ranges of them."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self.stack = contextlib.ExitStack()
        self.handles: dict[Path, object] = {}

    def _handle(self, key: str):
        from safetensors import safe_open

        if key not in self.files:
            raise UserError(f"tensor '{key}' is not in the checkpoint (sharded loading)")
        path = self.files[key]
        if path not in self.handles:
            self.handles[path] = self.stack.enter_context(safe_open(path, "pt"))
        return self.handles[path]

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._handle(key).get_slice(key)[start:stop]

    def whole(self, key: str) -> torch.Tensor:
        return self._handle(key).get_tensor(key)

    def close(self) -> None:
        self.stack.close()


def _packed_rows(reader: _Reader, key: str, start: int, stop: int, layer, storage) -> torch.Tensor:
    """Rows [start, stop) of a packed tensor's storage (v1 zero points → v2), as `storage`.

    A 2-D tensor keeps its rows when viewed as the storage dtype (only the last dim changes);
    a 1-D one (g_idx) does not, so its range is cut out of the bytes."""
    if key.endswith(".g_idx"):
        size, logical = storage.itemsize, 4  # g_idx is int32 in the file
        first, last = start * size, stop * size  # the byte range this shard holds
        lo, hi = first // logical, -(-last // logical)
        raw = reader.rows(key, lo, hi).contiguous().view(torch.uint8)
        return raw[first - lo * logical : last - lo * logical].view(storage)
    t = reader.rows(key, start, stop)
    if key.endswith(".qzeros") and layer._v1_zeros:
        t, _ = zeros_v1_to_v2(t, layer.bits, layer.out_features)
    return t.contiguous().view(storage)


class _FileTensor:
    """A tensor still in a safetensors file: its shape, and `take` reads only the rows holding
    the requested elements (v1 zero points read as v2, as load_quantized does)."""

    def __init__(self, reader: _Reader, key: str, layer: nn.Module, v1_zeros: bool):
        self.reader, self.key, self.layer, self.v1_zeros = reader, key, layer, v1_zeros
        self.shape = torch.Size(reader._handle(key).get_slice(key).get_shape())

    def numel(self) -> int:
        return self.shape.numel()

    def take(self, flat_indices: torch.Tensor) -> torch.Tensor:
        width = self.numel() // self.shape[0] if len(self.shape) else 1
        rows = {}
        for row in sorted(set((flat_indices // width).tolist())):
            t = self.reader.rows(self.key, row, row + 1)
            if self.v1_zeros and self.key.endswith(".qzeros"):
                t, _ = zeros_v1_to_v2(t, self.layer.bits, self.layer.out_features)
            rows[row] = t.reshape(-1)
        return torch.stack([rows[i // width][i % width] for i in flat_indices.tolist()])


def file_state_of(model: nn.Module, files: dict[str, Path]):
    """A `state_of(name, layer)` for base_fingerprint that reads, from the files, only the
    elements the fingerprint samples (a few hundred rows per tensor, not the layer)."""
    reader = _Reader(files)
    v1 = getattr(getattr(model, "quant_config", None), "checkpoint_format", "") == "gptq"

    def state_of(name: str, layer: nn.Module) -> dict[str, _FileTensor]:
        return {key: _FileTensor(reader, f"{name}.{key}", layer, v1) for key in layer.state_dict()}

    return state_of


def _local_rows(param: torch.Tensor) -> tuple[int, int]:
    """The [start, stop) rows of dim 0 this process holds of an FSDP2 (Shard(0)) parameter."""
    from torch.distributed.tensor import Shard

    if tuple(param.placements) != (Shard(0),):
        raise RuntimeError(f"unexpected FSDP placement {param.placements}")
    rows, ranks = param.shape[0], param.device_mesh.size()
    chunk = math.ceil(rows / ranks)
    start = min(param.device_mesh.get_local_rank() * chunk, rows)
    return start, min(start + chunk, rows)


def shard_and_load(accelerator, model: nn.Module, base: nn.Module, seed: int) -> nn.Module:
    """Shard the meta `model` with accelerate's FSDP2 and fill each process's shards from the
    files of `base` (the meta model `packed_base_on_meta` built, now inside `model`)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model  # deferred: slow, FSDP only

    method = method_of(model)
    files = base._qdiablo_files
    v1 = base.quant_config.checkpoint_format == "gptq"
    kept = {n: b.clone() for n, b in model.named_buffers() if not b.is_meta}  # rotary tables
    model = fsdp2_prepare_model(accelerator, model)
    model.to_empty(device=accelerator.device)
    owners = {}
    for module_name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            module._v1_zeros = v1
            for p in PACKED_NAMES:
                owners[f"{module_name}.{p}" if module_name else p] = module
    reader = _Reader(files)
    try:
        with torch.no_grad():
            for name, param in model.named_parameters():
                local = param.to_local() if hasattr(param, "to_local") else param
                start, stop = _local_rows(param) if hasattr(param, "placements") else (0, None)
                if param.requires_grad:
                    full = method.initial_value(name, param, seed)
                    local.copy_(full[start:stop].to(local.dtype))
                    continue
                key = method.base_key(name)
                stop = param.shape[0] if stop is None else stop
                if name in owners:
                    local.copy_(_packed_rows(reader, key, start, stop, owners[name], local.dtype))
                else:
                    local.copy_(reader.rows(key, start, stop).to(local.dtype))
            for name, buf in model.named_buffers():
                if name in kept:
                    buf.copy_(kept[name])
                else:  # persistent buffers (a QuantLinear's bias): whole, from the file
                    buf.copy_(reader.whole(method.base_key(name)).to(buf.dtype))
    finally:
        reader.close()
    log.info("loaded the packed base shard by shard (%d processes)", accelerator.num_processes)
    return model
