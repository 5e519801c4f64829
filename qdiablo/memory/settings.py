"""What `qdiablo plan` plans for: one dataclass, whose fields are also its flags (no torch import,
so `qdiablo --help` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from qdiablo.adapters.registry import ADAPTER_CHOICES
from qdiablo.errors import UserError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PRECISION_BYTES = {"fp32": None, "bf16": 2, "fp16": 2}  # None: the parameters' dtype


def _meta(help: str, **extra: Any) -> dict[str, Any]:
    return {"help": help, **extra}


@dataclass
class PlanSettings:
    """The setup to plan for (each field is a `qdiablo plan` flag)."""

    bits: int | None = field(
        default=None,
        metadata=_meta("bits of the packed base (default: a quantize folder's, else 4)"),
    )
    group_size: int | None = field(
        default=None, metadata=_meta("group size (default: a quantize folder's, else 128)")
    )
    base: str = field(
        default="packed",
        metadata=_meta("packed (gptq/rtn) or fp (float weights)", choices=("packed", "fp")),
    )
    adapter: str = field(default="diablo", metadata=_meta("the adapter", choices=ADAPTER_CHOICES))
    num_blocks: int = field(default=64, metadata=_meta("DiaBlo blocks per layer, N"))
    rank: int = field(default=64, metadata=_meta("LoRA rank r (--adapter lora)"))
    dropout: float = field(default=0.05, metadata=_meta("adapter dropout (its masks cost memory)"))
    micro_batch: int = field(default=1, metadata=_meta("training examples per forward pass"))
    seq_len: int = field(default=2048, metadata=_meta("tokens per training example"))
    precision: str = field(
        default="bf16",
        metadata=_meta("training compute dtype (autocast)", choices=tuple(PRECISION_BYTES)),
    )
    dtype: str = field(
        default="bfloat16",
        metadata=_meta("dtype of the base's float weights", choices=tuple(DTYPE_BYTES)),
    )
    checkpointing: bool = field(default=True, metadata=_meta("gradient checkpointing"))
    processes: int = field(default=1, metadata=_meta("FSDP2 processes sharing the model"))
    device: str = field(
        default="cuda",
        metadata=_meta("where the work runs: cuda (device peaks) or cpu", choices=("cuda", "cpu")),
    )
    memory_gib: float | None = field(
        default=None,
        metadata=_meta(
            "device memory in GiB for the largest micro-batch (a '24 GB' GPU has 24 GiB); "
            "default: this machine's GPU, if any"
        ),
    )
    distill: bool = field(
        default=False,
        metadata=_meta(
            "train: with --distill, the full-precision teacher beside the student (its weights, "
            "and its logits with the KL's float32 tensors in the loss); not under FSDP"
        ),
    )
    calib_samples: int = field(default=128, metadata=_meta("quantize: calibration windows"))
    calib_seq_len: int = field(default=2048, metadata=_meta("quantize: tokens per window"))
    reconstruct: bool = field(
        default=False, metadata=_meta("quantize: block-wise reconstruction (--reconstruct)")
    )
    recon_e2e: bool = field(
        default=True,
        metadata=_meta(
            "quantize: with --reconstruct, its end-to-end stage (on unless --recon-e2e-epochs "
            "0), which backpropagates through the whole packed model on the device"
        ),
    )
    eval_batch: int = field(default=16, metadata=_meta("eval: examples per batch"))
    eval_prompt: int = field(default=256, metadata=_meta("eval: prompt tokens"))
    eval_new_tokens: int = field(default=512, metadata=_meta("eval: generated tokens"))
    eval_reference: int = field(
        default=128, metadata=_meta("eval: tokens of the reference response (its NLL)")
    )
    dequant_cache: bool = field(
        default=False,
        metadata=_meta("eval: keep every packed layer dequantized (the whole-model copy)"),
    )
    shard_gib: float = field(default=5.0, metadata=_meta("export: shard size in GiB"))

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise UserError(f"--{f.name.replace('_', '-')}: choose from {', '.join(choices)}")
        for name in ("num_blocks", "rank", "micro_batch", "seq_len", "processes", "eval_batch"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be ≥ 1")
        if self.distill and self.processes > 1:
            raise UserError("--distill is refused under FSDP (--processes > 1): plan one process")
