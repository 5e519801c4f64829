"""Block-wise reconstruction: after GPTQ/RTN has quantized a decoder block, train that block's
quantization parameters so that its outputs match the full-precision block's.

For block b with full-precision function F_b (its ORIGINAL weights, from before MagR) and the
quantized block Q_b(·; θ), the inputs differ: the full-precision model feeds X_fp, the
quantized model so far feeds X_q. Reconstruction minimises, over the calibration windows,

    L(θ) = ‖Q_b(X_q; θ) − F_b(X_fp)‖² / ‖F_b(X_fp)‖²

so the quantized block also corrects for the error the blocks before it left in X_q.

The parameters θ keep the packed GPTQ layout. Each layer's weight is

    w[o, i] = (q[o, i] − z[g, o]) · s₀[g, o] · m[g, o],    q = clamp(round_ste(V), 0, 2^b − 1)

with g = g_idx[i]: a latent V in code units (started at the GPTQ codes, so step 0 is exactly the
GPTQ result), round_ste the rounding whose gradient is the identity (straight-through), integer
zero points z (kept), and a per-group scale multiplier m (started at 1) on the stored scales s₀.
Training in code units is what makes it work: a latent in weight units started on the grid gives
the scale a gradient of about zero. Adam takes separate learning rates for V and m.

At the end the codes are rounded, the scales s₀·m rounded to fp16 (what the layout stores), and
the layers packed again. A held-out share of the calibration windows measures the error: the
training stops early when it rises (the best parameters are kept), and a block whose held-out
error did not improve keeps its GPTQ result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from quantizers.calibration import block_output, to_device
from quantizers.config import RECON_PARAMS, QuantConfig
from quantizers.quant_linear import QuantLinear, dequantize_cache
from quantizers.rtn import MIN_SCALE, QuantResult

log = logging.getLogger(__name__)


@dataclass
class BlockRecon:
    """What reconstruction did to one block (relative squared output errors, see the module
    docstring; `heldout_*` is None without a held-out split)."""

    name: str
    train_before: float
    train_after: float
    heldout_before: float | None
    heldout_after: float | None
    steps: int
    codes_changed: float  # fraction of the block's codes that differ from GPTQ's
    kept: bool  # False: held-out error did not improve, the GPTQ result stays
    seconds: float


def round_ste(x: Tensor) -> Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (x.round() - x).detach()


def split_holdout(
    calib_data: Sequence[Tensor], fraction: float
) -> tuple[list[Tensor], list[Tensor]]:
    """Split calibration windows into (train, held-out) batches: the last round(fraction·n)
    windows are held out (at least one when fraction > 0), batched as the input was."""
    windows = [w for batch in calib_data for w in batch.split(1)]
    n = len(windows)
    hold = 0 if fraction <= 0 else min(max(1, round(fraction * n)), n - 1)
    if fraction > 0 and hold < 1:
        raise ValueError(
            f"reconstruction's held-out split needs at least 2 calibration windows, got {n}"
        )
    size = calib_data[0].shape[0]

    def rebatch(ws: list[Tensor]) -> list[Tensor]:
        out: list[list[Tensor]] = []
        for w in ws:
            if out and len(out[-1]) < size and out[-1][0].shape == w.shape:
                out[-1].append(w)
            else:
                out.append([w])
        return [torch.cat(b) for b in out]

    return rebatch(windows[: n - hold]), rebatch(windows[n - hold :])


class TrainableQuantLinear(nn.Module):
    """A QuantLinear's codes and scales as trainable parameters (see the module docstring)."""

    def __init__(self, layer: QuantLinear, train_codes: bool = True, train_scales: bool = True):
        super().__init__()
        self.bits = layer.bits
        self.group_size = layer.group_size
        self.maxq = 2**layer.bits - 1
        packed = layer.packed_tensors()
        codes = layer.codes().float()
        self.latent = nn.Parameter(codes, requires_grad=train_codes)
        self.register_buffer("codes0", codes.to(torch.uint8))
        self.register_buffer("scales0", packed.scales.float())
        self.register_buffer("zeros", layer.zeros().float())
        self.register_buffer("g_idx", packed.g_idx.long())
        self.multiplier = nn.Parameter(torch.ones_like(self.scales0), requires_grad=train_scales)
        self.bias = layer.bias

    def current_codes(self) -> Tensor:
        return torch.clamp(round_ste(self.latent), 0, self.maxq)

    def current_scales(self) -> Tensor:
        """s₀·m rounded to fp16 (what the layout stores; floor MIN_SCALE), as float32."""
        s = (self.scales0 * self.multiplier.detach()).clamp(min=MIN_SCALE)
        return s.half().float()

    def weight(self, fp16_scales: bool = False) -> Tensor:
        """The dequantized weight [out, in]; fp16_scales: the scales as they will be stored."""
        s = self.current_scales() if fp16_scales else self.scales0 * self.multiplier
        g = self.g_idx
        return (self.current_codes() - self.zeros.t()[:, g]) * s.t()[:, g]

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype), bias)

    @torch.no_grad()
    def clamp_latent_(self) -> None:
        """Keep V where a step back can still move the code (clamp's gradient is 0 outside)."""
        self.latent.clamp_(-0.49, self.maxq + 0.49)

    @torch.no_grad()
    def result(self) -> QuantResult:
        codes = self.current_codes().to(torch.uint8)
        return QuantResult(
            codes, self.current_scales(), self.zeros.to(torch.int32), self.g_idx.int(), self.bits
        )

    def to_quant_linear(self) -> QuantLinear:
        return QuantLinear.from_result(self.result(), self.group_size, self.bias)


def _swap(block: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    setattr(parent, child, new)


def _device_of(block: nn.Module, fallback: Tensor) -> torch.device:
    return next((t.device for t in block.parameters()), fallback.device)


@torch.no_grad()
def block_error(
    block: nn.Module, inputs: Sequence[Tensor], kwargs: Sequence[dict], targets: Sequence[Tensor]
) -> float:
    """Σ‖block(x) − y‖² / Σ‖y‖² over batches (each moved to the block's device in turn)."""
    num = den = 0.0
    if not inputs:
        return 0.0
    device = _device_of(block, inputs[0])
    for x, kw, y in zip(inputs, kwargs, targets):
        out = block_output(block(x.to(device), **to_device(kw, device))).float()
        y = y.to(device).float()
        num += float(((out - y) ** 2).sum())
        den += float((y**2).sum())
    return num / den if den > 0 else 0.0


def train_block(
    block: nn.Module,
    inputs: Sequence[Tensor],
    kwargs: Sequence[dict],
    targets: Sequence[Tensor],
    heldout: int = 0,
    steps: int = 60,
    lr_code: float = 1e-2,
    lr_scale: float = 1e-3,
    params: str = "scales+codes",
    eval_every: int = 10,
    patience: int = 1,
    autocast_dtype: torch.dtype | None = None,
    name: str = "block",
) -> BlockRecon:
    """Train the QuantLinear layers of `block` in place (see the module docstring).

    Every `eval_every` steps the held-out error is measured and the best parameters so far are
    kept; training stops after `patience` evaluations in a row without a new best. The default,
    60 steps stopping at the first rise, was chosen by measurement (SmolLM2 W2 g64, BENCHMARKS.md):
    the held-out error rises for a while when codes start to flip, and 100 steps with patience 5
    went past that, lowered the blocks' held-out errors about 3x further and changed 5-10% of the
    codes, but the model's perplexity on other text did not improve (75 vs 70) at 2.4x the time.

    inputs/kwargs: the quantized model's block inputs X_q per batch; targets: the
    full-precision block's outputs F(X_fp) per batch; the last `heldout` batches are held out.
    The batches may live on the host (offloaded): each is moved to the block's device when used.
    Runs with gradients enabled whatever the caller's mode; the block's other parameters
    (norms) are not trained.
    """
    if params not in RECON_PARAMS:
        raise ValueError(f"params: expected one of {RECON_PARAMS}, got {params!r}")
    start = time.perf_counter()
    n_train = len(inputs) - heldout
    if n_train < 1:
        raise ValueError(f"{name}: reconstruction needs at least one training batch")
    train = (inputs[:n_train], kwargs[:n_train], targets[:n_train])
    hold = (inputs[n_train:], kwargs[n_train:], targets[n_train:])
    device = _device_of(block, inputs[0])

    def autocast():
        if autocast_dtype is None:
            return torch.autocast(device_type=device.type, enabled=False)
        return torch.autocast(device_type=device.type, dtype=autocast_dtype)

    def errors() -> tuple[float, float | None]:
        with dequantize_cache(block), autocast():
            return block_error(block, *train), (block_error(block, *hold) if heldout else None)

    originals = {n: m for n, m in block.named_modules() if isinstance(m, QuantLinear)}
    train_before, heldout_before = errors()
    frozen = {p: p.requires_grad for p in block.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    layers = {
        n: TrainableQuantLinear(m, "codes" in params, "scales" in params)
        for n, m in originals.items()
    }
    for n, m in layers.items():
        _swap(block, n, m)
    groups = []
    if "codes" in params:
        groups.append({"params": [m.latent for m in layers.values()], "lr": lr_code})
    if "scales" in params:
        groups.append({"params": [m.multiplier for m in layers.values()], "lr": lr_scale})
    optimizer = torch.optim.Adam(groups)

    def snapshot() -> list[Tensor]:
        return [p.detach().clone() for g in groups for p in g["params"]]

    best, best_state, step, stale = heldout_before, snapshot(), 0, 0
    try:
        with torch.enable_grad():
            for step in range(1, steps + 1):
                k = (step - 1) % n_train
                x, kw = train[0][k].to(device), to_device(train[1][k], device)
                with autocast():
                    out = block_output(block(x, **kw)).float()
                y = train[2][k].to(device).float()
                loss = ((out - y) ** 2).sum() / (y**2).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for m in layers.values():
                    m.clamp_latent_()
                if heldout and (step % eval_every == 0 or step == steps):
                    with autocast():
                        err = block_error(block, *hold)
                    log.debug("%s: step %d, held-out error %.5f", name, step, err)
                    if err < best:
                        best, best_state, stale = err, snapshot(), 0
                        continue
                    stale += 1
                    if stale >= patience:
                        log.debug("%s: no held-out gain in %d checks: stopping", name, stale)
                        break
        if heldout:
            with torch.no_grad():
                for p, saved in zip((p for g in groups for p in g["params"]), best_state):
                    p.copy_(saved)
        packed = {n: m.to_quant_linear() for n, m in layers.items()}
        changed = sum(int((m.result().codes != m.codes0).sum()) for m in layers.values())
        total = sum(m.codes0.numel() for m in layers.values())
    finally:
        for p, was in frozen.items():
            p.requires_grad_(was)
    for n, m in packed.items():
        _swap(block, n, m)
    train_after, heldout_after = errors()
    kept = heldout_after < heldout_before if heldout else train_after < train_before
    if not kept:
        for n, m in originals.items():
            _swap(block, n, m)
    return BlockRecon(
        name,
        train_before,
        train_after,
        heldout_before,
        heldout_after,
        step,
        changed / max(total, 1),
        kept,
        time.perf_counter() - start,
    )


def reconstruct_block(
    block: nn.Module,
    inputs: Sequence[Tensor],
    kwargs: Sequence[dict],
    targets: Sequence[Tensor],
    heldout: int,
    config: QuantConfig,
    autocast_dtype: torch.dtype | None = None,
    name: str = "block",
) -> BlockRecon:
    """`train_block` with a QuantConfig's settings, logged (one INFO line per block)."""
    rec = train_block(
        block,
        inputs,
        kwargs,
        targets,
        heldout=heldout,
        steps=config.recon_steps,
        lr_code=config.recon_lr_code,
        lr_scale=config.recon_lr_scale,
        params=config.recon_params,
        eval_every=config.recon_eval_every,
        patience=config.recon_patience,
        autocast_dtype=autocast_dtype,
        name=name,
    )
    held = (
        ""
        if rec.heldout_before is None
        else f", held-out {rec.heldout_before:.5f} -> {rec.heldout_after:.5f}"
    )
    log.info(
        "%s: reconstruction %d steps in %.1f s: train error %.5f -> %.5f%s; %.2f%% codes changed%s",
        name,
        rec.steps,
        rec.seconds,
        rec.train_before,
        rec.train_after,
        held,
        100 * rec.codes_changed,
        "" if rec.kept else "; no held-out gain: GPTQ result kept",
    )
    return rec


def recon_markdown(blocks: Sequence[BlockRecon], heldout_windows: int) -> list[str]:
    """The report's reconstruction table (no lines when reconstruction did not run)."""
    if not blocks:
        return []
    seconds = sum(r.seconds for r in blocks)
    lines = [
        "",
        f"Block-wise reconstruction ({heldout_windows} calibration windows held out; "
        f"{seconds:.0f} s): relative squared block output error",
        "",
        "| block | train before → after | held-out before → after | steps | codes changed | kept |",
        "|---|---|---|---|---|---|",
    ]
    for r in blocks:
        held = (
            "—" if r.heldout_before is None else f"{r.heldout_before:.5f} → {r.heldout_after:.5f}"
        )
        lines.append(
            f"| {r.name} | {r.train_before:.5f} → {r.train_after:.5f} | {held} | {r.steps} "
            f"| {100 * r.codes_changed:.2f}% | {'yes' if r.kept else 'no (GPTQ result)'} |"
        )
    return lines
