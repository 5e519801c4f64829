"""Calibration: tokens in, one decoder block at a time, input Hessians H = XᵀX/n out.

A Hugging Face causal LM is run up to its first decoder block once, to capture the block's inputs
(hidden states plus the keyword arguments the model passes: position embeddings, masks). From
then on each block is run on its own, so only one block needs to live on the compute device, and
each block sees the outputs of the blocks already quantized before it.

Inside a block, the linear layers are grouped by the tensor they read: q/k/v share one input,
gate/up another. One group at a time (`true_sequential`), the block is run with pre-hooks that
accumulate XᵀX for the group and then stop the forward pass early, so later, more expensive parts
of the block are not computed for nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Calibration batches
# ---------------------------------------------------------------------------------------------


def token_windows(
    tokenizer, texts: Iterable[str], seq_len: int = 256, max_tokens: int | None = None
) -> Tensor:
    """The one windowing rule: texts tokenized one by one, joined with the EOS token and cut into
    consecutive windows of `seq_len` (no padding, no attention mask), as LongTensor [windows,
    seq_len]; at most `max_tokens` tokens are read. No whole window is a ValueError."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.extend(sep)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"the texts hold {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def tokenize_calibration(
    tokenizer,
    texts: Iterable[str],
    num_samples: int = 128,
    seq_len: int = 256,
    batch_size: int = 8,
) -> list[Tensor]:
    """Pack texts into `num_samples` token windows of `seq_len` (`token_windows`), batched as
    LongTensor (B, T). Fewer windows are returned, with a warning, when the texts are too short
    for `num_samples`; none at all is an error.
    """
    if num_samples < 1 or seq_len < 2 or batch_size < 1:
        raise ValueError(
            f"num_samples ({num_samples}), seq_len ({seq_len}) and batch_size ({batch_size}) "
            "must be positive (seq_len at least 2)"
        )
    try:
        data = token_windows(tokenizer, texts, seq_len, max_tokens=num_samples * seq_len)
    except ValueError as e:
        raise ValueError(f"calibration {e}") from None
    if len(data) < num_samples:
        log.warning(
            "calibration texts hold %d windows of %d tokens instead of %d",
            len(data),
            seq_len,
            num_samples,
        )
    return list(data.split(batch_size))


def check_calibration_data(calib_data: Sequence[Tensor]) -> None:
    """calib_data must be a non-empty list of LongTensor (B, T)."""
    if not isinstance(calib_data, list | tuple) or not calib_data:
        raise ValueError("calib_data must be a non-empty list of LongTensor (batch, seq_len)")
    for i, batch in enumerate(calib_data):
        if not isinstance(batch, Tensor) or batch.dtype != torch.long or batch.dim() != 2:
            what = (
                f"{batch.dtype} tensor of shape {tuple(batch.shape)}"
                if isinstance(batch, Tensor)
                else type(batch).__name__
            )
            raise ValueError(f"calib_data[{i}] must be a LongTensor (batch, seq_len), got {what}")


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder blocks: the ModuleList of config.num_hidden_layers modules
    (model.model.layers for LLaMA, Mistral, Qwen2, Gemma, Phi-3, SmolLM)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len(module) == n:
            return name, module
    raise ValueError(
        f"{type(model).__name__}: found no list of {n} decoder blocks to quantize "
        "(expected e.g. model.model.layers)"
    )


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


def to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors inside nested tuples/lists/dicts to `device`."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    calib_data: Sequence[Tensor],
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Run the model up to its first block on each batch; return the block's hidden-state inputs
    (in `dtype`; None: as the model made them) and keyword arguments, moved to `device`. Only
    what runs before the first block needs real weights: the blocks may be on the meta device."""
    hidden: list[Tensor] = []
    kwargs: list[dict[str, Any]] = []

    def grab(_module, args, kw):
        h = args[0] if args else kw.pop("hidden_states")
        hidden.append(h.to(device, dtype or h.dtype))
        kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value")}
        kwargs.append(to_device(kw, device))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    model_device = next(model.parameters()).device
    try:
        for batch in calib_data:
            with contextlib.suppress(_Stop):
                model(batch.to(model_device), use_cache=False)
    finally:
        handle.remove()
    return hidden, kwargs


def block_output(out: Any) -> Tensor:
    """A decoder block returns a tensor (transformers 5) or a tuple whose first item it is."""
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def run_block(block: nn.Module, hidden: Sequence[Tensor], kwargs: Sequence[dict]) -> list[Tensor]:
    return [block_output(block(h, **kw)) for h, kw in zip(hidden, kwargs)]


@torch.no_grad()
def run_block_(
    block: nn.Module,
    hidden: list[Tensor],
    kwargs: Sequence[dict],
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> None:
    """Replace each batch of `hidden` by the block's output on it, in place: computed on
    `device`, kept where the batch was (the device, or the host when offloaded), in `dtype`
    (None: as the block made it). Only one batch is ever held twice."""
    for j, kw in enumerate(kwargs):
        h = hidden[j]
        out = block_output(block(h.to(device), **to_device(kw, device)))
        hidden[j] = out.to(h.device, dtype or out.dtype)


def block_linears(block: nn.Module, block_name: str) -> dict[str, nn.Linear]:
    """The nn.Linear layers of a block; other layer types holding a 2-D weight are an error."""
    linears = {}
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear):
            linears[name] = module
        elif type(module).__name__ == "Conv1D":
            raise ValueError(
                f"{block_name}.{name}: transformers Conv1D layers (weight stored in×out) are not "
                "supported by the quantizers; only nn.Linear is"
            )
    return linears


@torch.no_grad()
def input_groups(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    hidden: Tensor,
    kwargs: dict,
    device: torch.device | None = None,
) -> list[list[str]]:
    """Linear layers grouped by shared input, in execution order: [[q,k,v], [o], [gate,up],
    [down]] for LLaMA. This is also the `true_sequential` order. `device`: where to run (the
    batch is moved there; None: where it is)."""
    seen: list[tuple[str, Tensor]] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, args, n=name: seen.append((n, args[0])))
        for name, m in linears.items()
    ]
    if device is not None:
        hidden, kwargs = hidden.to(device), to_device(kwargs, device)
    try:
        block(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last: Tensor | None = None
    done: set[str] = set()
    for name, x in seen:
        if name in done:
            continue
        done.add(name)
        if last is not None and x is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    unused = [n for n in linears if n not in done]
    if unused:
        log.warning("layers never called on calibration data, left unquantized: %s", unused)
    return groups


@torch.no_grad()
def collect_hessians(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    groups: Sequence[Sequence[str]],
    hidden: Sequence[Tensor],
    kwargs: Sequence[dict],
    product_dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> dict[str, Tensor]:
    """H = XᵀX / n (float32) of the first layer of each group; the forward pass stops right after
    the last group's input has been seen. `device`: where to run, each batch moved there in turn
    (None: where the batches are).

    product_dtype: compute each batch's XᵀX in this dtype (e.g. bfloat16, ~4x faster on CPU),
    still summing the batches in float32. Rounding the product perturbs every entry by up to 2⁻⁹
    of its size; with SmolLM2's outlier channels that makes H indefinite (down to
    −0.58·mean(diag H)) and GPTQ's Cholesky retries with more damping on ~10% of the Hessians
    (benchmarks/hessians_smollm2.py); product_dtype=None (float32, quantize_model's default)
    avoids it."""
    firsts = [g[0] for g in groups]
    stop_at = groups[-1][-1]
    H: dict[str, Tensor] = {}
    count: dict[str, int] = {}

    def accumulate(name: str, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if name not in H:
            H[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            count[name] = 0
        if product_dtype in (None, torch.float32):
            x = x.float()
            H[name].addmm_(x.t(), x)
        else:
            x = x.to(product_dtype)
            H[name] += (x.t() @ x).float()
        count[name] += x.shape[0]

    def hook(name: str):
        def pre(_m, args):
            if name in firsts:
                accumulate(name, args[0])
            if name == stop_at:
                raise _Stop

        return pre

    names = set(firsts) | {stop_at}
    handles = [linears[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for h, kw in zip(hidden, kwargs):
            if device is not None:
                h, kw = h.to(device), to_device(kw, device)
            with contextlib.suppress(_Stop):
                block(h, **kw)
    finally:
        for handle in handles:
            handle.remove()
    return {name: H[name] / count[name] for name in H}
