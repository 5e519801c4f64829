"""Training under FSDP2 (`accelerate launch` with `fsdp_version: 2`): what is allowed, and how
the adapter and optimizer state leave and re-enter a sharded model.

The engine is accelerate's FSDP2 (`fully_shard` per decoder block). The packed base shards like
any parameter because QuantLinear keeps its bytes in frozen parameters (int32 by default, which
no mixed-precision policy casts). Checkpoints stay world-size free:
- the adapter is gathered (`DTensor.full_tensor`) into an ordinary adapter folder that loads
  without FSDP;
- the optimizer state is saved unsharded, keyed by parameter name
  (`torch.distributed.checkpoint.state_dict`, full_state_dict), so a run resumes on any number
  of processes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from qdiablo.adapters.common import is_dtensor, trainable_named
from qdiablo.errors import UserError
from qdiablo.kinds import PACKED_KINDS
from quantizers.quant_linear import QuantLinear

FSDP_OPTIMIZER = "optimizer.pt"  # the unsharded optimizer state (same name as Trainer's)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def fsdp_requested() -> bool:
    """Whether `accelerate launch` was given an FSDP config."""
    return _env_true("ACCELERATE_USE_FSDP")


def check_fsdp_launch(base: str, packed_storage: str = "int32", precision: str = "fp32") -> bool:
    """True under an FSDP2 launch; a clear error for what FSDP cannot run here."""
    if not fsdp_requested():
        return False
    version = os.environ.get("FSDP_VERSION", "1").strip()
    if version != "2":
        raise UserError(
            f"FSDP version {version} is not supported: FSDP1 flattens each unit into one tensor "
            "of one dtype, which packed integer codes next to float weights cannot share",
            hint="set fsdp_version: 2 in the accelerate config (see examples/fsdp2.yaml)",
        )
    if base == "nf4":
        raise UserError(
            "--base nf4 cannot train under FSDP: sharding drops bitsandbytes' quant_state",
            hint="use --base gptq or rtn (packed, sharded) or fp, or train nf4 with DDP",
        )
    if base in PACKED_KINDS and _env_true("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        raise UserError(
            "fsdp_cpu_ram_efficient_loading is not supported with a packed base",
            hint="set fsdp_cpu_ram_efficient_loading: false (see examples/fsdp2.yaml)",
        )
    if base in PACKED_KINDS and packed_storage.startswith("float"):
        wanted = {"bf16": "bfloat16", "fp16": "float16"}
        policies = {wanted.get(precision), wanted.get(os.environ.get("ACCELERATE_MIXED_PRECISION"))}
        cast_to = sorted(p for p in policies if p is not None and p != packed_storage)
        if cast_to:
            raise UserError(
                f"--packed-storage {packed_storage} under FSDP with a {cast_to[0]} mixed-precision "
                "policy: FSDP would cast the stored packed bytes to it and scramble the codes",
                hint=f"use --packed-storage int32 (never cast) or {cast_to[0]}",
            )
    return True


def enable_on_cpu(accelerator) -> None:
    """Turn accelerate's FSDP2 on for CPU processes (gloo), which accelerate leaves off: it only
    builds the FSDP plugin for GPU-like devices. The plugin is the one `accelerate launch`
    configured (from its FSDP_* variables); preparation and sharding stay accelerate's."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    plugin = FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP


def fsdp_own_activation_checkpointing() -> bool:
    """Whether the accelerate config asks FSDP to checkpoint activations itself."""
    return _env_true("FSDP_ACTIVATION_CHECKPOINTING")


def gather_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter in full on CPU, by name. A collective under FSDP: every rank
    must call it."""
    out = {}
    for name, p in trainable_named(model):
        t = p.detach()
        out[name] = (t.full_tensor() if is_dtensor(t) else t).cpu()
    return out


def resident_bytes(tensors) -> int:
    """Bytes this process holds for these tensors: a DTensor counts its local shard only."""
    total = 0
    for t in tensors:
        local = t.to_local() if is_dtensor(t) else t
        total += local.numel() * local.element_size()
    return total


def packed_base_bytes(model: nn.Module) -> int:
    """Bytes of the packed base (every QuantLinear's packed tensors) held by this process."""
    return resident_bytes(
        p for m in model.modules() if isinstance(m, QuantLinear) for p in m.parameters()
    )


def save_full_optimizer(model: nn.Module, optimizer, folder: str | Path, is_main: bool) -> None:
    """Write the optimizer state unsharded, keyed by parameter name (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(model, optimizer, options=options)
    if is_main:
        path = Path(folder) / FSDP_OPTIMIZER
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)


def saved_by_name(path: str | Path) -> bool:
    """Whether an optimizer file holds the unsharded, name-keyed state `save_full_optimizer`
    writes (rather than torch's index-keyed `optimizer.state_dict()`)."""
    if not Path(path).is_file():
        return False
    state = torch.load(path, map_location="cpu", weights_only=True)
    return any(isinstance(k, str) for k in state.get("state", {}))


def load_full_optimizer(model: nn.Module, optimizer, folder: str | Path) -> None:
    """Read an unsharded optimizer state into a (possibly differently) sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    path = Path(folder) / FSDP_OPTIMIZER
    if not path.is_file():
        raise UserError(f"{path}: missing, cannot resume the optimizer state")
    state = torch.load(path, map_location="cpu", weights_only=True)
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=options)
