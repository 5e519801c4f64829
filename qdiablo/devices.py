"""One device rule for every verb: `--device auto` (the default) is CUDA when torch sees a GPU,
else the CPU; `--device cpu`, `cuda`, `cuda:1` are taken as given (a missing GPU is an error).

On a GPU the default compute dtype is bfloat16 where the GPU has it (Ampere and newer), else
float16; on the CPU it stays float32, as before. fp32 matmuls may use TF32 on the GPU (about 8×
the fp32 rate on Ampere, with a 10-bit mantissa in the products and fp32 accumulation); the
adapters keep fp32 master weights whatever the compute dtype.

Under `accelerate launch` / torchrun each process takes the GPU of its LOCAL_RANK.
"""

from __future__ import annotations

import argparse
import os

import torch

from qdiablo.errors import UserError


def add_device_argument(p: argparse.ArgumentParser, what: str = "the work runs") -> None:
    """The one `--device` flag every verb shares."""
    p.add_argument(
        "--device",
        default="auto",
        help=f"where {what}: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or "
        "cuda:N",
    )


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None) → this process's CUDA device when there is one, else the CPU; anything
    else as given, checked: a CUDA device that is not there is a UserError."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(
            f"--device {name!r}: not a device", hint="use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {name}: torch sees no CUDA GPU here",
                hint="use --device auto or cpu, or install a CUDA build of torch",
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)",
                hint="cuda:0 is the first",
            )
    elif device.type not in ("cpu", "meta"):
        raise UserError(f"--device {name}: qdiablo runs on cpu or cuda", hint="use auto")
    return device


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU that has it (else float16); float32 on the CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def allow_tf32(device: torch.device) -> None:
    """Let fp32 matmuls and convolutions use TF32 on the GPU (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors now: the GPU's free memory, or the host's MemAvailable (what
    Linux can hand out without swapping; the total where /proc/meminfo is missing)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
