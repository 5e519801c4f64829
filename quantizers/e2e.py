"""Reconstruction's end-to-end stage: after the blocks, every packed layer's per-group scales
train together so that the whole quantized model's next-token distributions match the
full-precision model's (EfficientQAT's E2E-QP, with distillation as the loss).

The loss is KL(teacher ‖ student) over the calibration windows. The teacher is the
full-precision model itself, run once before quantization starts: its top-k next-token
log-probabilities (and the probability mass outside them, as one more bin) are kept per token,
so the full-precision model need not stay in memory, and the KL is exact on those k + 1 bins
(a lower bound of the full KL that is tight when the tail is small; k = 64 keeps all but a
small share of the mass on this kind of text).

`loss="lm"` trains on the plain language-model loss of the calibration text instead (the next
token's cross-entropy; no teacher), for comparison.

Scales train as multipliers (quantizers.trained_scales), with Adam and a cosine learning rate
over shuffled mini-batches of the training windows; the held-out windows' KL is measured every
`eval_every` steps, the best multipliers are kept, and they are folded into the fp16 scales at
the end (the packed layout is unchanged). Without a held-out improvement the scales stay as the
block-wise stage left them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from quantizers.calibration import (
    block_output,
    capture_block_inputs,
    find_decoder_blocks,
    to_device,
)
from quantizers.lazy import blocks_standing_aside
from quantizers.trained_scales import add_multipliers, fold_multipliers, packed_layers

log = logging.getLogger(__name__)


@dataclass
class TopK:
    """A teacher's next-token distribution on one batch: the top-k token ids and their
    log-probabilities, [B, T, k], and the log of the mass outside them, [B, T]."""

    ids: Tensor
    logprobs: Tensor
    rest: Tensor


@dataclass
class E2EReport:
    steps: int
    heldout_before: float | None
    heldout_after: float | None
    kept: bool
    seconds: float


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x ≤ 0, kept finite."""
    return torch.log((-torch.expm1(x.clamp(max=-1e-7))).clamp(min=1e-30))


@torch.no_grad()
def teacher_topk(
    model: nn.Module,
    batches: Sequence[Tensor],
    k: int,
    autocast_dtype: torch.dtype | None,
    device: torch.device | str | None = None,
    load_block: Callable[[int, torch.device], nn.Module] | None = None,
    keep: torch.device | str | None = None,
) -> list[TopK]:
    """The model's top-k next-token log-probabilities on every batch (run before quantizing),
    kept where the head runs.

    Block by block, like the calibration pass: every batch's hidden states go through block i
    on `device` before block i + 1 is read, so each block is read once, however many batches
    (a streamed model's blocks, from `load_block`, are read from disk and put back on the meta
    device; a whole model's are moved to `device` and back). The hidden states stay on `keep`
    (default `device`; the host when quantize offloads its activations). The model's own
    final norm and head then run on them."""
    host = next(p.device for p in model.parameters() if not p.is_meta)
    device = torch.device(device) if device is not None else host
    keep = torch.device(keep) if keep is not None else device
    _, blocks = find_decoder_blocks(model)
    hidden, kwargs = capture_block_inputs(model, blocks, batches, keep)
    returns_tuple = False
    for i in tqdm(range(len(blocks)), desc="teacher distributions", unit="block", leave=False):
        block = load_block(i, device) if load_block is not None else blocks[i].to(device)
        with _autocast(device, autocast_dtype):
            for j, kw in enumerate(kwargs):
                out = block(hidden[j].to(device), **to_device(kw, device))
                returns_tuple = isinstance(out, tuple | list)
                hidden[j] = block_output(out).to(keep)
        block.to("meta" if load_block is not None else host)  # freed, or back where it was
    out = []
    for batch, h in zip(batches, hidden):
        with _autocast(host, autocast_dtype), blocks_standing_aside(blocks, h, returns_tuple):
            logits = model(batch.to(host), use_cache=False).logits
        logp = F.log_softmax(logits.float(), dim=-1)
        top, ids = logp.topk(k, dim=-1)
        rest = _log1mexp(torch.logsumexp(top, dim=-1))
        out.append(TopK(ids.int(), top, rest))
    return out


def lm_loss(student_logits: Tensor, batch: Tensor) -> Tensor:
    """Mean next-token cross-entropy of the batch's own tokens."""
    logits = student_logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def _loss(logits: Tensor, batch: Tensor, target: TopK | None) -> Tensor:
    return lm_loss(logits, batch.to(logits.device)) if target is None else topk_kl(logits, target)


def topk_kl(student_logits: Tensor, target: TopK) -> Tensor:
    """Mean over tokens of KL(teacher ‖ student) on the teacher's top-k bins plus one bin for
    the rest of the vocabulary."""
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    picked = log_s.gather(-1, target.ids.long())
    rest_s = _log1mexp(torch.logsumexp(picked, dim=-1))
    kl = (target.logprobs.exp() * (target.logprobs - picked)).sum(-1)
    kl = kl + target.rest.exp() * (target.rest - rest_s)
    return kl.mean()


def _recompute_activations(model: nn.Module) -> Callable[[], None]:
    """Recompute each block's activations in the backward pass instead of keeping them: the
    stage backpropagates through the whole model, and the kept activations of every block grow
    with depth × width × tokens. Returns the undo (a no-op for a model without support)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        return lambda: None
    was_training = model.training
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # transformers recomputes only in training mode (dropout stays as configured)

    def undo() -> None:
        model.activation_checkpointing_disable()
        model.train(was_training)

    return undo


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def _heldout_loss(model, batches, targets, device, dtype) -> float:
    total = 0.0
    for batch, target in zip(batches, targets):
        with _autocast(device, dtype):
            total += float(_loss(model(batch.to(device), use_cache=False).logits, batch, target))
    return total / max(1, len(batches))


def train_scales_end_to_end(
    model: nn.Module,
    batches: Sequence[Tensor],
    targets: Sequence[TopK] | None,
    heldout: int,
    epochs: float,
    lr: float,
    eval_every: int = 8,
    patience: int = 2,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
    checkpointing: bool | None = None,
) -> E2EReport:
    """Train every packed layer's scale multiplier of `model` against the teacher's `targets`
    (None: the batches' own next tokens), the last `heldout` batches held out, then fold them
    into the stored scales. `checkpointing`: recompute each block's activations in the backward
    pass (None: on a GPU only; the results are the same either way)."""
    start = time.perf_counter()
    device = next(model.parameters()).device
    n_train = len(batches) - heldout
    train_b, hold_b = batches[:n_train], batches[n_train:]
    targets = list(targets) if targets is not None else [None] * len(batches)
    train_t, hold_t = targets[:n_train], targets[n_train:]
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    add_multipliers(model, requires_grad=True)
    params = [m.scale_multiplier for m in packed_layers(model).values()]
    if checkpointing is None:  # on a GPU, where device memory is the limit
        checkpointing = device.type != "cpu"
    recompute = _recompute_activations(model) if checkpointing else lambda: None
    before = _heldout_loss(model, hold_b, hold_t, device, autocast_dtype) if heldout else None
    best, best_state = before, [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=lr)
    total = max(1, math.ceil(epochs * n_train))
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < total:
        order += torch.randperm(n_train, generator=gen).tolist()
    stale, step, running = 0, 0, torch.zeros((), device=device)
    try:
        with torch.enable_grad():
            bar = tqdm(order[:total], desc="end-to-end scales", unit="step", leave=False)
            for step, k in enumerate(bar, start=1):
                for g in optimizer.param_groups:
                    g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / total))
                with _autocast(device, autocast_dtype):
                    logits = model(train_b[k].to(device), use_cache=False).logits
                loss = _loss(logits, train_b[k], train_t[k])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                # Summed on the device and read only every `eval_every` steps: reading the loss
                # each step would make the host wait for the GPU at every step.
                if (step - 1) % eval_every == 0:
                    running = torch.zeros((), device=device)
                running = running + loss.detach()
                if step % eval_every == 0 or step == total:
                    shown = {"kl": f"{float(running) / ((step - 1) % eval_every + 1):.4f}"}
                    bar.set_postfix(shown)
                if heldout and (step % eval_every == 0 or step == total):
                    err = _heldout_loss(model, hold_b, hold_t, device, autocast_dtype)
                    bar.set_postfix(shown | {"held-out": f"{err:.4f}"})
                    log.debug("end-to-end: step %d, held-out KL %.5f", step, err)
                    if err < best:
                        best, best_state, stale = err, [p.detach().clone() for p in params], 0
                    else:
                        stale += 1
                        if stale >= patience:
                            break
    finally:
        recompute()
        for p, was in frozen.items():
            p.requires_grad_(was)
    with torch.no_grad():
        for p, saved in zip(params, best_state):
            p.copy_(saved)
    fold_multipliers(model)
    after = _heldout_loss(model, hold_b, hold_t, device, autocast_dtype) if heldout else None
    kept = heldout == 0 or (after is not None and before is not None and after < before)
    report = E2EReport(step, before, after, kept, time.perf_counter() - start)
    log.info(
        "end-to-end scales: %d steps in %.0f s%s",
        step,
        report.seconds,
        "" if before is None else f", held-out loss {before:.4f} -> {after:.4f}",
    )
    return report
