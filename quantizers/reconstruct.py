"""Block-wise reconstruction: after GPTQ/RTN has quantized a decoder block, train that block's
quantization parameters so that its outputs match the full-precision block's.

For block b with full-precision function F_b (its ORIGINAL weights, from before MagR) and the
quantized block Q_b(·; θ), the inputs differ: the full-precision model feeds X_fp, the
quantized model so far feeds X_q. Reconstruction minimises, over the calibration tokens t,

    L(θ) = mean_t ‖Q_b(X_q; θ)_t − F_b(X_fp)_t‖² / ‖F_b(X_fp)_t‖²

so the quantized block also corrects for the error the blocks before it left in X_q. Each
token's error is relative to its own norm: summed over tokens first, the loss would be that of
the attention-sink tokens alone, whose hidden states are two orders of magnitude larger than the
others' in the middle blocks (`token_relative_error`).

The parameters θ keep the packed GPTQ layout. Each layer's weight is

    w[o, i] = (q[o, i] − z[g, o]) · s₀[g, o] · m[g, o],    q = clamp(round_ste(V), 0, 2^b − 1)

with g = g_idx[i]: a latent V in code units (started at the GPTQ codes, so step 0 is exactly the
GPTQ result), round_ste the rounding whose gradient is the identity (straight-through), integer
zero points z (kept), and a per-group scale multiplier m (started at 1) on the stored scales s₀.
Training in code units is what makes it work: a latent in weight units started on the grid gives
the scale a gradient of about zero. Adam takes separate learning rates for V and m.

With `recon_norms`, the block's normalisation weights (RMSNorm/LayerNorm, stored in full
precision beside the packed layers) train too: a per-input-channel scale in front of q/k/v and
gate/up, which the per-group scales m cannot express.

The schedule: epochs over all training windows in shuffled mini-batches (`recon_batch_size`
windows a step), a cosine learning-rate decay over the planned steps, and early stopping on
held-out windows that come from another source or another slice of the same source than the
training windows (qdiablo passes them; the library falls back to the last windows). Every
`recon_eval_every` steps the held-out error is measured, the best parameters so far are kept, and
a block stops after `recon_patience` evaluations without a new best.

At the end the codes are rounded, the scales s₀·m rounded to fp16 (what the layout stores), and
the layers packed again. A block whose held-out error did not improve keeps its GPTQ result.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quantizers.calibration import block_output, to_device
from quantizers.config import RECON_PARAMS, QuantConfig
from quantizers.quant_linear import QuantLinear, dequantize_cache
from quantizers.trainable import TrainableQuantLinear

log = logging.getLogger(__name__)

TRAIN_PROBE = 8  # training batches the report's "train before → after" error is measured on


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


def _swap(block: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    setattr(parent, child, new)


def token_relative_error(out: Tensor, target: Tensor) -> Tensor:
    """Each token's ‖out − y‖² / ‖y‖², [..., tokens] (float32).

    Per token, not summed over tokens first: from SmolLM2's block 11 on, the first token of
    every window (an attention sink) carries a hidden state ~150× the median norm, 99% of the
    batch's Σ‖y‖²; a loss summed over tokens then fits that one token and ignores the rest."""
    y = target.float()
    return ((out.float() - y) ** 2).sum(-1) / (y**2).sum(-1).clamp(min=1e-12)


def _device_of(block: nn.Module, fallback: Tensor) -> torch.device:
    return next((t.device for t in block.parameters()), fallback.device)


@torch.no_grad()
def block_error(
    block: nn.Module, inputs: Sequence[Tensor], kwargs: Sequence[dict], targets: Sequence[Tensor]
) -> float:
    """The mean over all tokens of the batches of each token's relative squared error (each
    batch moved to the block's device in turn: they may live on the host)."""
    total, count = 0.0, 0
    if not inputs:
        return 0.0
    device = _device_of(block, inputs[0])
    for x, kw, y in zip(inputs, kwargs, targets):
        out = block_output(block(x.to(device), **to_device(kw, device)))
        err = token_relative_error(out, y.to(device))
        total += float(err.sum())
        count += err.numel()
    return total / count if count else 0.0


@dataclass
class ReconSchedule:
    """How one block trains (QuantConfig's recon_* fields; see `QuantConfig` for each)."""

    epochs: float = 4.0
    steps: int | None = None  # overrides epochs
    lr_code: float = 3e-2
    lr_scale: float = 3e-3
    lr_norm: float = 1e-3
    params: str = "scales+codes"
    norms: bool = False
    schedule: str = "cosine"
    eval_every: int = 8
    patience: int = 2
    seed: int = 0

    @classmethod
    def from_config(cls, config: QuantConfig) -> ReconSchedule:
        return cls(
            epochs=config.recon_epochs,
            steps=config.recon_steps,
            lr_code=config.recon_lr_code,
            lr_scale=config.recon_lr_scale,
            lr_norm=config.recon_lr_norm,
            params=config.recon_params,
            norms=config.recon_norms,
            schedule=config.recon_schedule,
            eval_every=config.recon_eval_every,
            patience=config.recon_patience,
            seed=config.recon_seed,
        )

    def total_steps(self, train_batches: int) -> int:
        return self.steps or max(1, math.ceil(self.epochs * train_batches))

    def lr_factor(self, step: int, total: int) -> float:
        """The learning-rate multiplier at `step` (0-based) of `total`."""
        if self.schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * step / total))


def norm_parameters(block: nn.Module) -> list[nn.Parameter]:
    """The block's normalisation weights (and biases): RMSNorm / LayerNorm modules, found by
    class name so that every architecture's own norm class counts."""
    found = []
    for module in block.modules():
        if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("Norm"):
            found += [p for p in module.parameters(recurse=False) if p.is_floating_point()]
    return found


def _batch_order(n_train: int, total: int, seed: int) -> list[int]:
    """Training batch indices for `total` steps: whole shuffled epochs (seeded), then part of
    one more."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < total:
        order += torch.randperm(n_train, generator=gen).tolist()
    return order[:total]


def train_block(
    block: nn.Module,
    inputs: Sequence[Tensor],
    kwargs: Sequence[dict],
    targets: Sequence[Tensor],
    heldout: int = 0,
    schedule: ReconSchedule | None = None,
    autocast_dtype: torch.dtype | None = None,
    name: str = "block",
) -> BlockRecon:
    """Train the QuantLinear layers of `block` in place (see the module docstring).

    inputs/kwargs: the quantized model's block inputs X_q per batch; targets: the
    full-precision block's outputs F(X_fp) per batch; the last `heldout` batches are held out.
    The batches may live on the host (offloaded): each is moved to the block's device when used.
    Runs with gradients enabled whatever the caller's mode.
    """
    sched = schedule or ReconSchedule()
    if sched.params not in RECON_PARAMS:
        raise ValueError(f"params: expected one of {RECON_PARAMS}, got {sched.params!r}")
    start = time.perf_counter()
    n_train = len(inputs) - heldout
    if n_train < 1:
        raise ValueError(f"{name}: reconstruction needs at least one training batch")
    train = (inputs[:n_train], kwargs[:n_train], targets[:n_train])
    hold = (inputs[n_train:], kwargs[n_train:], targets[n_train:])
    autocast = _autocast_factory(_device_of(block, inputs[0]), autocast_dtype)

    # the report's training error: on the first TRAIN_PROBE batches (it decides nothing)
    probe = tuple(part[:TRAIN_PROBE] for part in train)

    def errors() -> tuple[float, float | None]:
        with dequantize_cache(block), autocast():
            return block_error(block, *probe), (block_error(block, *hold) if heldout else None)

    originals = {n: m for n, m in block.named_modules() if isinstance(m, QuantLinear)}
    norms = norm_parameters(block) if sched.norms else []
    norms0 = [p.detach().clone() for p in norms]
    train_before, heldout_before = errors()
    frozen = {p: p.requires_grad for p in block.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    layers = {
        n: TrainableQuantLinear(m, "codes" in sched.params, "scales" in sched.params)
        for n, m in originals.items()
    }
    for n, m in layers.items():
        _swap(block, n, m)
    groups = _param_groups(layers, norms, sched)
    try:
        steps = _optimise(block, layers, groups, train, hold, heldout_before, sched, autocast, name)
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
    # (without held-out windows the decision reads the probe batches' error: all of them when
    # there are at most TRAIN_PROBE, as in every test and small run)
    if not kept:
        for n, m in originals.items():
            _swap(block, n, m)
        with torch.no_grad():
            for p, saved in zip(norms, norms0):
                p.copy_(saved)
    return BlockRecon(
        name,
        train_before,
        train_after,
        heldout_before,
        heldout_after,
        steps,
        changed / max(total, 1),
        kept,
        time.perf_counter() - start,
    )


def _autocast_factory(device: torch.device, dtype: torch.dtype | None):
    def autocast():
        if dtype is None:
            return torch.autocast(device_type=device.type, enabled=False)
        return torch.autocast(device_type=device.type, dtype=dtype)

    return autocast


def _param_groups(
    layers: dict[str, TrainableQuantLinear], norms: list[nn.Parameter], sched: ReconSchedule
) -> list[dict]:
    groups = []
    if "codes" in sched.params:
        groups.append({"params": [m.latent for m in layers.values()], "lr": sched.lr_code})
    if "scales" in sched.params:
        groups.append({"params": [m.multiplier for m in layers.values()], "lr": sched.lr_scale})
    if norms:
        for p in norms:
            p.requires_grad_(True)
        groups.append({"params": norms, "lr": sched.lr_norm})
    return groups


def _optimise(block, layers, groups, train, hold, best, sched, autocast, name) -> int:
    """Adam over the training batches with the schedule's learning rate, held-out checks and
    early stopping; leaves the best parameters in place. Returns the steps taken."""
    optimizer = torch.optim.Adam(groups)
    params = [p for g in groups for p in g["params"]]
    base_lrs = [g["lr"] for g in groups]
    n_train, heldout = len(train[0]), len(hold[0])
    total = sched.total_steps(n_train)
    best_state, stale, step = [p.detach().clone() for p in params], 0, 0
    with torch.enable_grad():
        for step, k in enumerate(_batch_order(n_train, total, sched.seed), start=1):
            for g, lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr * sched.lr_factor(step - 1, total)
            device = _device_of(block, train[0][k])
            x, kw = train[0][k].to(device), to_device(train[1][k], device)
            with autocast():
                out = block_output(block(x, **kw))
            loss = token_relative_error(out, train[2][k].to(device)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for m in layers.values():
                m.clamp_latent_()
            if heldout and (step % sched.eval_every == 0 or step == total):
                with autocast():
                    err = block_error(block, *hold)
                log.debug("%s: step %d, held-out error %.5f", name, step, err)
                if err < best:
                    best, best_state, stale = err, [p.detach().clone() for p in params], 0
                    continue
                stale += 1
                if stale >= sched.patience:
                    log.debug("%s: no held-out gain in %d checks: stopping", name, stale)
                    break
    if heldout:
        with torch.no_grad():
            for p, saved in zip(params, best_state):
                p.copy_(saved)
    for p in params:
        p.requires_grad_(False)
    return step


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
        schedule=ReconSchedule.from_config(config),
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
        f"{seconds:.0f} s): mean per-token relative squared block output error (train: on "
        f"the first {TRAIN_PROBE} training batches)",
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
