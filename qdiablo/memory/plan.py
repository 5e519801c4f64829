"""The memory planner: predicted host and device peaks of quantize, train, eval and export for a
model (its config.json only) and a setup, and the largest micro-batch that fits a device.

Every figure is arithmetic on the model built on the meta device (`qdiablo.memory.shapes`): the
model state from its tensors (`state`), the activations from the layer formulas
(`activations`), the quantize and export peaks from the bounds their streaming loops keep
(issue 19, items 2 and 8; docs/memory.md). Nothing is allocated, so a 405B plans in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qdiablo.adapters.registry import get_adapter
from qdiablo.memory.activations import (
    Adapted,
    Dtypes,
    EvalActivations,
    TrainActivations,
    eval_activations,
    input_of,
    train_activations,
)
from qdiablo.memory.settings import DTYPE_BYTES, PRECISION_BYTES, PlanSettings
from qdiablo.memory.shapes import ModelSource, build_on_meta
from qdiablo.memory.state import StateBytes, state_bytes

GiB = 1024**3
HOST_RUNTIME = int(0.5 * GiB)
"""Host memory of a `qdiablo train` process before any model is loaded: Python, torch,
transformers, accelerate and qdiablo imported (measured: 0.49 GiB of RSS after the imports;
0.53 GiB peak for a whole run on a tiny model; CPU torch)."""
EVAL_RUNTIME = int(0.45 * GiB)
"""The same for `qdiablo eval`, which imports no Trainer (measured: 0.46 GiB peak, tiny model)."""
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest dynamic mmap threshold on 64-bit Linux
CPU_ALLOCATOR = 1.27
"""On the CPU a step's resident memory exceeds its live tensors: freed blocks below glibc's mmap
threshold stay in the heap, fragmented, and new ones do not always fit them. Measured: the live
tensors of a SmolLM2 step (0.908 GiB, exactly the formula) raised RSS by 1.215 GiB; over the three
sizes of BENCHMARKS.md ("Memory planner") the step's RSS is 1.24-1.31 times the formula's
activations, whose mean this is. On a GPU, `usable` accounts for the caching allocator."""
QUANTIZE_SLACK = int(1.5 * GiB)  # the constant in the quantize host bound


def usable(memory: int) -> int:
    """What a device of `memory` bytes leaves to tensors: 90 % (the caching allocator's
    fragmentation) less 0.5 GiB (the CUDA context and the cuBLAS workspace are not tensors)."""
    return int(0.9 * memory) - GiB // 2


@dataclass(frozen=True)
class Peak:
    """One verb's predicted peaks, in bytes (device None: the work runs on the host)."""

    verb: str
    host: int
    device: int | None
    note: str


class MemoryPlan:
    """The plan of one model and setup; see the module docstring."""

    def __init__(self, source: ModelSource, settings: PlanSettings):
        self.source, self.settings = source, settings
        s = settings
        self.bits = None if s.base == "fp" else (s.bits or source.bits or 4)
        self.group = s.group_size or source.group_size or 128
        self.shape = source.shape
        float_dtype = getattr(torch, s.dtype)
        self.model = build_on_meta(
            source.config, self.bits, self.group, float_dtype, s.adapter, s.num_blocks
        )
        self.state = state_bytes(self.model, s.processes)
        self.block_layers = _block_linears(self.model)
        self.per_block = [Adapted(n, i, o) for n, i, o, adapted in self.block_layers if adapted]
        shapes = [(i, o) for _, i, o, adapted in self.block_layers if adapted]
        adapter_state = get_adapter(s.adapter).plan_state_bytes(
            shapes * self.shape.layers, s.num_blocks, s.rank, s.processes
        )
        if adapter_state is not None:  # counted from the shapes, not the model
            self.state = StateBytes(
                self.state.packed, self.state.other, int(adapter_state / 4), self.state.buffers
            )
        p = DTYPE_BYTES[s.dtype]
        self.dtypes = Dtypes(param=p, compute=PRECISION_BYTES[s.precision] or p)
        self.largest = max((i * o for _, i, o, _ in self.block_layers), default=0)

    # ---- training ---------------------------------------------------------------------------

    def train_activations(self) -> TrainActivations:
        s = self.settings
        return train_activations(
            self.shape,
            self.per_block,
            self.dtypes,
            s.adapter,
            s.dropout,
            s.rank,
            self.largest if self.bits is not None else 0,
            0 if self.bits is not None else self.linear_weights(),
            distill=s.distill,
        )

    def teacher(self) -> int:
        """--distill's full-precision teacher: every weight in the float dtype (an fp base's
        float parameters already count its linear layers)."""
        if not self.settings.distill:
            return 0
        linears = self.linear_weights() * self.dtypes.param if self.bits is not None else 0
        return linears + self.state.other

    def linear_weights(self) -> int:
        """Weights of every decoder linear layer."""
        return sum(i * o for _, i, o, _ in self.block_layers) * self.shape.layers

    def train(self, micro_batch: int | None = None, seq_len: int | None = None) -> Peak:
        s = self.settings
        b, t = micro_batch or s.micro_batch, seq_len or s.seq_len
        act = self.train_activations().peak(b * t, self.shape.layers, s.checkpointing)
        teacher = self.teacher()
        need = self.state.total + teacher + act
        note = f"micro-batch {b}×{t}, state {_g(self.state.total)} + activations {_g(act)}"
        if teacher:
            note += f" + teacher {_g(teacher)}"
        if s.device == "cpu":
            host = HOST_RUNTIME + self.state.total + teacher + int(CPU_ALLOCATOR * act)
            return Peak("train", host, None, note)
        return Peak("train", HOST_RUNTIME + self.state.base, need, note)

    def largest_micro_batch(self, memory: int, seq_len: int | None = None) -> int:
        """The most examples per pass whose training peak fits `memory` bytes (0: none)."""
        budget = usable(memory)
        best = 0
        for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
            peak = self.train(b, seq_len)
            if (peak.device if peak.device is not None else peak.host) > budget:
                break
            best = b
        return best

    # ---- evaluation, quantize, export -------------------------------------------------------

    def eval_activations(self) -> EvalActivations:
        s, c = self.settings, self.dtypes.compute
        weights = self.linear_weights()
        if self.bits is None:
            dequant = 0
        elif s.dequant_cache:
            dequant = self.cpu_copy_bytes() if s.device == "cpu" else weights * c
        else:  # int32 codes and the float32 weight; the cast to c comes after the codes go
            dequant = 8 * self.largest
        return eval_activations(
            self.shape,
            self.dtypes,
            s.eval_batch,
            s.eval_prompt,
            s.eval_new_tokens,
            dequant,
            s.eval_reference,
            held=bool(s.dequant_cache and self.bits is not None),
        )

    def cpu_copy_bytes(self) -> int:
        """The whole-model float32 copy's resident cost on the CPU: it is built layer by layer
        beside each layer's int32 codes, freed at once. glibc serves blocks of 32 MiB and more
        with mmap and returns them when freed; smaller ones come from the heap, which the freed
        codes leave fragmented, as a step's activations do (CPU_ALLOCATOR)."""
        total = 0
        for _, i, o, _ in self.block_layers:
            size = 4 * i * o
            total += size if size >= MMAP_THRESHOLD else int(CPU_ALLOCATOR * size)
        return total * self.shape.layers

    def eval(self) -> Peak:
        act = self.eval_activations()
        need = self.state.base + act.total
        note = (
            f"KV cache {_g(act.kv_cache)}, prefill {_g(act.prefill)}, NLL pass {_g(act.nll)}, "
            f"{'dequantized copy' if self.settings.dequant_cache else 'one layer dequantized'} "
            f"{_g(act.dequant)}"
        )
        if self.settings.device == "cpu":
            return Peak("eval", EVAL_RUNTIME + need, None, note)
        return Peak("eval", EVAL_RUNTIME + self.state.base, need, note)

    def block_fp32(self) -> int:
        """B: one decoder block's parameters in float32."""
        per_layer = sum(i * o for _, i, o, _ in self.block_layers)
        return 4 * (per_layer + 2 * self.shape.hidden)

    def hessians(self) -> int:
        """H: GPTQ's XᵀX/n per group of layers reading the same tensor, float32."""
        groups = {}
        for name, i, _, _ in self.block_layers:
            groups[input_of(name)] = i
        return 4 * sum(i * i for i in groups.values())

    def packed_model(self) -> int:
        """P: the packed model as saved (codes, zeros, scales, g_idx; embeddings, norms, head)."""
        return (self.state.packed + self.state.other + self.state.buffers) * self.settings.processes

    def calibration(self) -> int:
        """A: the calibration activations, one hidden vector per token (bf16 on a GPU, float32
        on the CPU)."""
        s = self.settings
        size = 4 if s.device == "cpu" else 2
        return s.calib_samples * s.calib_seq_len * self.shape.hidden * size

    def quantize(self) -> Peak:
        """The bounds the streaming quantize keeps (issue 19 item 2; docs/memory.md):
        host P + 2B + A + 1.5 GiB, device B + H + 3A (6B + 3A with reconstruction, which holds
        the block, its float copy, the trainable scales and AdamW's state); on the CPU, where
        host and device are one, P + 2B + H + 3A + 1.5 GiB."""
        s = self.settings
        P, B, H, A = self.packed_model(), self.block_fp32(), self.hessians(), self.calibration()
        host = P + 2 * B + A + QUANTIZE_SLACK
        device = max(B + H, 6 * B if s.reconstruct else 0) + 3 * A
        note = f"{s.calib_samples}×{s.calib_seq_len} calibration tokens: {_g(A)}"
        e2e = self.end_to_end() if s.reconstruct and s.recon_e2e else 0
        if s.device == "cpu":
            e2e = HOST_RUNTIME + int(CPU_ALLOCATOR * e2e) if e2e else 0
            return Peak("quantize", max(P + 2 * B + H + 3 * A + QUANTIZE_SLACK, e2e), None, note)
        return Peak("quantize", host, max(device, e2e), note)

    def end_to_end(self) -> int:
        """Reconstruction's end-to-end stage (quantizers/e2e.py): the packed model and a
        training step's activations for one batch of windows (recomputed per block on a GPU,
        kept on the CPU), and in a layer's backward the float32 gradient of its whole weight
        (the scales' gradient is its sum over each group) beside the dequantized weight. The
        training formula counts an adapter's activations too, which this stage has not: an
        upper bound."""
        from quantizers import QuantConfig  # its windows a step: the quantizer's default

        s = self.settings
        tokens = QuantConfig().recon_batch_size * s.calib_seq_len
        act = self.train_activations().peak(tokens, self.shape.layers, s.device != "cpu")
        return self.packed_model() + act + 8 * self.largest

    def export(self) -> Peak:
        """`export --merged`, streamed (issue 19 item 8): host P + S + M + B + 1.5 GiB (S: one
        shard; M: one block merged, bf16); on a GPU the device holds one block dequantized and
        merged, 2B."""
        s = self.settings
        merged_model = 2 * (self.linear_weights() + self.state.other // DTYPE_BYTES[s.dtype])
        shard = min(int(s.shard_gib * GiB), merged_model)  # no shard is larger than the model
        P, B = self.packed_model(), self.block_fp32()
        merged = B // 2
        host = P + shard + merged + B + QUANTIZE_SLACK
        note = f"--merged: shards of {s.shard_gib:g} GiB, one block merged at a time"
        if s.device == "cpu":
            return Peak("export", host, None, note)
        return Peak("export", host, 2 * B, note)

    def peaks(self) -> list[Peak]:
        return [self.quantize(), self.train(), self.eval(), self.export()]


def _block_linears(model) -> list[tuple[str, int, int, bool]]:
    """(name, in, out, adapted) of each linear layer of the first decoder block; adapted: one of
    the architecture's default targets (the layers every method adapts by default), or a layer
    an attached adapter wraps (it holds its `base_layer`, not listed again)."""
    from qdiablo.diablo.targets import default_target_modules
    from quantizers import QuantLinear
    from quantizers.calibration import find_decoder_blocks

    inner = getattr(model, "model", model)  # an adapter model wraps the transformers model
    targets = set(default_target_modules(inner))
    _, blocks = find_decoder_blocks(inner)
    rows, wrappers = [], []
    for name, module in blocks[0].named_modules():
        if any(name.startswith(w + ".") for w in wrappers):
            continue  # the insides of a wrapped layer
        short = name.rsplit(".", 1)[-1]
        if isinstance(getattr(module, "base_layer", None), torch.nn.Module):
            wrappers.append(name)
            rows.append((short, module.in_features, module.out_features, True))
        elif isinstance(module, QuantLinear | torch.nn.Linear):
            rows.append((short, module.in_features, module.out_features, short in targets))
    return rows


def _g(n: int | float) -> str:
    return f"{n / GiB:.2f} GiB"
