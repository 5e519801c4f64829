"""Where and how a training run computes: the one device rule (qdiablo.devices) applied to a
TrainConfig before anything loads.

`auto` settings are resolved into concrete ones, and the resolved config is what the run
records (train_config.json) and what a resume is compared against:

| setting | on a GPU | on the CPU |
|---|---|---|
| --device auto | this process's GPU | the CPU |
| --precision auto | bf16 where the GPU has it, else fp16 | fp32 |
| --dtype auto (the base's float weights) | bfloat16 where the GPU has it, else float32 | float32 |
| --gradient-checkpointing (unset) | on for a quantized base (gptq, rtn, nf4, nf2) | off |
| --micro-batch-size (unset) | the largest the planner fits, dividing the batch | batch ÷ devices |

So on the CPU a run is exactly what it was before these defaults existed. The micro-batch comes
from `qdiablo.memory` (the `qdiablo plan` arithmetic) at --max-length tokens, the longest a
batch can be: the run's effective batch and its results do not depend on it, only its speed
and memory do.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from qdiablo.devices import allow_tf32, resolve_device
from qdiablo.errors import UserError
from qdiablo.kinds import PACKED_KINDS
from qdiablo.train.config import TrainConfig
from qdiablo.train.fsdp import fsdp_requested
from quantizers.registry import Names

log = logging.getLogger(__name__)

QUANTIZED_BASES = Names(lambda: (*PACKED_KINDS, "nf4", "nf2"))


@dataclass(frozen=True)
class Runtime:
    """What the resolution decided, for the run's records."""

    device: torch.device
    micro_batch_from: str  # "flag", "planner" or "batch" (batch ÷ devices)
    planner: dict[str, Any] | None = None  # the plan behind a chosen micro-batch

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "micro_batch_from": self.micro_batch_from,
            "planner": self.planner,
        }


def resolve_runtime(config: TrainConfig, devices: int = 1) -> tuple[TrainConfig, Runtime]:
    """`config` with every `auto` setting made concrete for this machine (see the module
    docstring), and what was decided. `devices`: the processes the batch is split over."""
    device = resolve_device(config.device)
    if device.type == "cuda":
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.index is not None and device.index != rank:
            raise UserError(
                f"--device {device}: this process trains on cuda:{rank} (its LOCAL_RANK)",
                hint=f"run with CUDA_VISIBLE_DEVICES={device.index} and --device cuda",
            )
        device = torch.device("cuda", rank)
        allow_tf32(device)
    gpu = device.type == "cuda"
    bf16 = gpu and torch.cuda.is_bf16_supported()
    changes: dict[str, Any] = {"device": str(device)}
    if config.precision == "auto":
        changes["precision"] = ("bf16" if bf16 else "fp16") if gpu else "fp32"
    if config.dtype == "auto":
        changes["dtype"] = "bfloat16" if bf16 else "float32"
    if config.gradient_checkpointing is None:
        changes["gradient_checkpointing"] = gpu and config.base in QUANTIZED_BASES
    resolved = dataclasses.replace(config, **changes)
    if config.micro_batch_size is not None:
        return resolved, Runtime(device, "flag")
    if not gpu:
        return resolved, Runtime(device, "batch")
    micro, planned = planned_micro_batch(resolved, device, devices)
    return dataclasses.replace(resolved, micro_batch_size=micro), Runtime(
        device, "planner", planned
    )


def planned_micro_batch(
    config: TrainConfig, device: torch.device, devices: int
) -> tuple[int, dict[str, Any]]:
    """The largest micro-batch the planner fits in this GPU's memory at --max-length tokens that
    divides the per-device batch (at least 1; a warning when even 1 is predicted not to fit)."""
    from qdiablo.memory.plan import GiB, MemoryPlan
    from qdiablo.memory.settings import PlanSettings
    from qdiablo.memory.shapes import load_source

    per_device = max(1, config.batch_size // devices)
    memory = torch.cuda.get_device_properties(device).total_memory
    try:
        source = load_source(config.model, config.gguf_file)
    except UserError as e:  # a model whose config the planner cannot read: no guess
        log.warning("micro-batch: %s; using the whole per-device batch %d", e, per_device)
        return per_device, {"error": str(e)}
    packed = config.base in PACKED_KINDS or config.base == "nf4"
    processes = devices if fsdp_requested() else 1  # FSDP2 shards the model state
    settings = PlanSettings(
        bits=(source.bits or 4) if packed else None,
        group_size=source.group_size or 64,
        base="packed" if packed else "fp",
        adapter=config.adapter,
        num_blocks=config.num_blocks or 64,
        rank=config.rank or 64,
        dropout=config.dropout,
        seq_len=config.max_length,
        precision=config.precision,
        dtype=config.dtype,
        checkpointing=bool(config.gradient_checkpointing),
        processes=processes,
        distill=bool(config.distill) and processes == 1,  # under FSDP train refuses it next
    )
    fits = MemoryPlan(source, settings).largest_micro_batch(memory)
    micro = max(
        (d for d in range(1, per_device + 1) if per_device % d == 0 and d <= fits), default=1
    )
    if fits == 0:
        log.warning(
            "the memory planner predicts that even 1 × %d tokens does not fit in %.0f GiB: "
            "see `qdiablo plan --model %s`",
            config.max_length,
            memory / GiB,
            config.model,
        )
    log.info(
        "micro-batch %d (the planner fits %d × %d tokens in %.0f GiB; batch %d per device)",
        micro,
        fits,
        config.max_length,
        memory / GiB,
        per_device,
    )
    return micro, {"fits": fits, "memory_gib": memory / GiB, "seq_len": config.max_length}
