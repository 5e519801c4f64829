"""No host sync in a training step (issue 19): a forward + backward of packed DiaBlo layers never
reads a value from the device, so a GPU never waits for the host between layers.

A TorchDispatchMode sees every aten call on CPU exactly as it would on a GPU, so it counts the
calls that make the host wait for a device result (inside qdiablo's custom packed-matmul ops
too, whose bodies it runs under itself): `_local_scalar_dense` (`.item()`, `bool(t)`,
`int(t)`), `item`, `equal`, and the ops whose output size depends on values (`nonzero`,
`masked_select`, boolean-mask indexing), which the host must read to allocate. Kernel selection
is cached, so its per-call cost is a dictionary lookup (checked by counting the device queries).
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

from qdiablo.diablo import DiaBloConfig, DiaBloLinear, get_diablo_model
from quantizers import (
    QuantConfig,
    QuantLinear,
    kernels,
    load_quantized,
    quantize_model,
    save_quantized,
)
from quantizers.rtn import QuantResult, rtn_quantize

REPO = Path(__file__).resolve().parents[1]
OURS = (str(REPO / "quantizers"), str(REPO / "qdiablo" / "diablo"))
SYNCING = {"_local_scalar_dense", "item", "equal", "nonzero", "masked_select", "unique"}


class SyncCounter(TorchDispatchMode):
    """Records each device→host read with the innermost repository line that caused it."""

    def __init__(self):
        super().__init__()
        self.syncs: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "qdiablo":  # our custom ops: look inside them too
            with self:
                return OPDEFS[func.name()]._init_fn(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
        )
        if name in SYNCING or bool_index:
            self.syncs.append((name, _site()))
        return func(*args, **(kwargs or {}))

    def ours(self) -> list[tuple[str, str]]:
        """The reads asked for by quantizers/ or qdiablo/diablo/ code."""
        return [s for s in self.syncs if s[1].startswith(OURS)]


def _site() -> str:
    """The innermost caller outside torch itself: a repository line, or the library's file."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        f = frame.filename
        if "/torch/" in f or f == __file__:
            continue
        return f"{f}:{frame.lineno}"
    return "torch"


def packed_layer(in_f: int, out_f: int, bits: int, group: int, act_order: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    result = rtn_quantize(torch.randn(out_f, in_f, generator=g), bits, group)
    if act_order:
        perm = torch.randperm(in_f, generator=g)
        result = QuantResult(result.codes, result.scales, result.zeros, result.g_idx[perm], bits)
    return QuantLinear.from_result(result, group, torch.randn(out_f, generator=g))


def test_the_counter_sees_a_sync():
    """The instrument itself: the group-size check reads the device, and is seen doing so."""
    with SyncCounter() as counter:
        kernels.group_size_of(torch.arange(64) // 32)
    assert counter.ours() and {"_local_scalar_dense", "equal"} <= {s[0] for s in counter.syncs}
    with SyncCounter() as counter:
        torch.arange(8)[torch.arange(8) > 3].sum()
    assert [s[0] for s in counter.syncs] == ["index"]


@pytest.mark.parametrize("autocast", [False, True])
def test_packed_diablo_layers_never_read_the_device(autocast):
    """Every bit width (3-bit values straddle words), act-order and plain groups, a bias,
    dropout: forward and backward of the first step after building, counted in full."""
    kernels.set_kernel(None)
    torch.manual_seed(0)
    layers = []
    for i, (bits, act_order) in enumerate(
        [(2, False), (3, True), (4, False), (8, True), (3, False)]
    ):
        layer = DiaBloLinear(packed_layer(96, 96, bits, 32, act_order, i), 4, dropout=0.1)
        nn.init.normal_(layer.blocks, std=0.02)
        layers.append(layer)
    model = nn.Sequential(*layers).train()
    x = torch.randn(2, 5, 96, requires_grad=True)
    with SyncCounter() as counter, torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        model(x).float().square().sum().backward()
    assert counter.syncs == [], counter.syncs
    assert all(layer.blocks.grad is not None for layer in layers) and x.grad is not None


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_loaded_packed_model_trains_without_syncs_of_ours(tmp_path, checkpointing):
    """The real path: quantize, save, load, move, attach DiaBlo, one training step of the tiny
    LLaMA (gradient checkpointing recomputes every layer in backward). transformers may read
    the device itself (mask checks); quantizers/ and qdiablo/diablo/ never do."""
    model = make_tiny_llama()
    quantize_model(model, None, QuantConfig(method="rtn", bits=3, group_size=32))
    save_quantized(model, tmp_path / "q")
    base = load_quantized(tmp_path / "q").to("cpu").to(torch.float32)
    base.config.use_cache = False
    wrapped = get_diablo_model(base, DiaBloConfig(num_blocks=8, dropout=0.05))
    if checkpointing:
        wrapped.model.activation_checkpointing_enable({"use_reentrant": False})
    wrapped.train()
    ids = torch.randint(0, 261, (2, 24))
    with SyncCounter() as counter:
        wrapped(input_ids=ids, labels=ids).loss.backward()
    assert counter.ours() == [], counter.ours()
    assert all(p.grad is not None for p in wrapped.parameters() if p.requires_grad)


def test_kernel_selection_is_cached(monkeypatch):
    """After the first call per (device, dtype, bits, M side), `select` decides nothing again:
    no device capability or triton version is read per call."""
    kernels.set_kernel(None)
    calls = []
    real = kernels._select
    monkeypatch.setattr(kernels, "_select", lambda *a: calls.append(a) or real(*a))
    x = torch.randn(3, 8)
    for _ in range(5):
        assert kernels.select(x, 4) == "torch"
    kernels.select(torch.randn(40, 8), 4)  # M above AUTO_TRITON_MAX_M: a new decision
    kernels.select(x.double(), 4)
    assert len(calls) == 3
    kernels.set_kernel("torch")  # a new mode forgets the cache
    kernels.select(x, 4)
    assert len(calls) == 4
    kernels.set_kernel(None)


def test_the_end_to_end_scale_stage_reads_its_loss_only_every_eval_every_steps():
    """Quantize's end-to-end stage shows its loss in the progress bar: summed on the device and
    read once per `eval_every` steps (and at the last), never once per step."""
    from quantizers.e2e import train_scales_end_to_end

    torch.manual_seed(0)
    model = make_tiny_llama()
    quantize_model(model, None, QuantConfig(method="rtn", bits=2, group_size=32))
    batches = [torch.randint(0, 261, (2, 16)) for _ in range(9)]
    with SyncCounter() as counter:
        report = train_scales_end_to_end(
            model, batches, None, heldout=0, epochs=1, lr=1e-3, eval_every=4
        )
    assert report.steps == 9
    e2e = REPO / "quantizers" / "e2e.py"
    lines = e2e.read_text().splitlines()
    # Adam reads its step count, a host tensor even for a GPU's parameters: not a device sync.
    reads = [
        s
        for s in counter.syncs
        if s[1].startswith(f"{e2e}:")
        and "optimizer.step()" not in lines[int(s[1].split(":")[-1]) - 1]
    ]
    assert len(reads) == 3, reads  # steps 4, 8 and 9
