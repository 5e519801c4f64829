"""What a run measures about itself: throughput, peak memory, and the base's resident bytes.

- Throughput counts the non-padding tokens Trainer feeds (prompt + response), over all devices,
  per second of optimizer steps; the first step (allocations, warm-up) is reported apart.
- Peak memory is the process's peak resident set (Linux VmHWM; reset after loading so that the
  training phase has its own figure) and, on CUDA, the allocator's peak.
- Resident bytes of the base's linear layers count what each layer really holds: packed integers,
  scales and zeros for QuantLinear, the packed bytes plus quantization state for bitsandbytes,
  the float weights otherwise. Adapters and the output head are left out.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from qdiablo.adapters.registry import methods
from qdiablo.optional import loaded

# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start (or since `reset_peak_rss`)."""
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cuda_peak_bytes() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


# --------------------------------------------------------------------------------------------
# Resident bytes of the base's linear layers
# --------------------------------------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes this process holds: a tensor sharded by FSDP (a DTensor) counts its local shard."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _bnb_linear_types() -> tuple[type, ...]:
    bnb = loaded("bitsandbytes")  # its layers exist only once it is imported
    return () if bnb is None else (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def _is_base_linear(module: nn.Module, bnb_types: tuple[type, ...]) -> bool:
    """A frozen base linear layer (not an adapter's wrapper, which may share its class name)."""
    if type(module) is nn.Linear or (bnb_types and isinstance(module, bnb_types)):
        return True
    return callable(getattr(module, "packed_tensors", None))  # quantizers.QuantLinear


def layer_resident_bytes(module: nn.Module) -> int:
    """Bytes a base linear layer keeps in memory (its own tensors, not its children's)."""
    total = 0
    for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        if t is None:
            continue
        total += _tensor_bytes(t.data if isinstance(t, nn.Parameter) else t)
        quant_state = getattr(t, "quant_state", None)
        if quant_state is not None:  # bitsandbytes: absmax, code, nested statistics
            total += sum(
                _tensor_bytes(v)
                for v in quant_state.as_dict(packed=True).values()
                if isinstance(v, torch.Tensor)
            )
    return total


def base_linear_bytes(model: nn.Module) -> dict[str, int]:
    """Resident bytes and count of the base's linear layers, the output head excluded."""
    head = None
    inner = model
    for _ in range(4):  # DiaBloModel / PeftModel wrap the HF model
        if hasattr(inner, "get_output_embeddings"):
            try:
                head = inner.get_output_embeddings()
                break
            except (AttributeError, NotImplementedError):
                pass
        inner = getattr(inner, "model", None) or getattr(inner, "base_model", None)
        if inner is None:
            break
    total, count, logical = 0, 0, 0
    bnb_types = _bnb_linear_types()

    def adapter(name: str) -> bool:  # an adapter's own layers (LoRA's A and B) are not the base
        return any(method.is_adapter_tensor(name) for method in methods())

    for name, module in model.named_modules():
        if module is head or adapter(name) or not _is_base_linear(module, bnb_types):
            continue
        total += layer_resident_bytes(module)
        logical += module.in_features * module.out_features
        count += 1
    return {"bytes": total, "layers": count, "weights": logical}


# --------------------------------------------------------------------------------------------
# Trainer callbacks
# --------------------------------------------------------------------------------------------


class ThroughputCallback(TrainerCallback):
    """Times every optimizer step and the tokens it consumed; tracks peak memory."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.step_tokens: list[int] = []
        self._t0 = 0.0
        self._tokens0 = 0
        self.peak_rss_at_start = 0
        self.peak_rss_before_train = 0
        self.train_seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.peak_rss_before_train = peak_rss_bytes()  # loading, quantizing, wrapping
        reset_peak_rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.peak_rss_at_start = peak_rss_bytes()
        self._train_t0 = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()
        self._tokens0 = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(time.perf_counter() - self._t0)
        self.step_tokens.append(int(state.num_input_tokens_seen - self._tokens0))

    def on_train_end(self, args, state, control, **kwargs):
        self.train_seconds = time.perf_counter() - self._train_t0

    def summary(self) -> dict[str, float | int | None]:
        steady_t = sum(self.step_times[1:])
        steady_tok = sum(self.step_tokens[1:])
        return {
            "steps_timed": len(self.step_times),
            "first_step_seconds": self.step_times[0] if self.step_times else None,
            "tokens_per_second": steady_tok / steady_t if steady_t > 0 else None,
            "seconds_per_step": steady_t / (len(self.step_times) - 1)
            if len(self.step_times) > 1
            else None,
            "train_seconds": self.train_seconds,
            "tokens_seen": sum(self.step_tokens),
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_rss_before_train_bytes": self.peak_rss_before_train,
            "rss_at_train_start_bytes": self.peak_rss_at_start,
            "cuda_peak_bytes": cuda_peak_bytes(),
        }


class JsonlLogCallback(TrainerCallback):
    """Appends every Trainer log record (loss, lr, grad norm, ...) to a JSON Lines file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": state.epoch, **logs}
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=float) + "\n")
