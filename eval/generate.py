"""Fast batched generation for evaluation.

The reference scripts generate one example at a time (LLM-Adapters even turns the KV cache off).
Here:

- prompts are sorted by length (longest first, so the memory peak comes at once) and cut into
  batches, which keeps left padding small;
- greedy decoding is our own loop over a KV cache (`DynamicCache`): one prefill, then one token per
  step, with explicit position ids so that left padding changes nothing. A sequence that emits EOS
  stops, and its row is dropped from the batch and the cache at once, so the remaining rows no
  longer pay for it (`generate` keeps computing finished rows until the whole batch is done);
- beam search (the `llm-adapters` preset) goes through `model.generate` on the same batches;
- a quantized base (qdiablo's `QuantLinear`) either dequantizes its weights once for the whole
  run (`quantizers.dequantize_cache`: fast, but a float copy of every layer) or each layer at
  each call (one layer's float weight at a time, or none where the fused kernels run):
  `dequant_cache_fits` decides for `qdiablo eval --dequant-cache auto`.

Greedy here is pure argmax decoding: the model's `generation_config` (sampling settings,
repetition penalties) is not applied, as the protocol asks. Batched greedy output equals
one-at-a-time greedy output (tested in float64 against `model.generate`; on SmolLM2 in float32 the
outputs were identical too, see BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from qdiablo.data import pad_batch
from quantizers import dequantize_cache

log = logging.getLogger(__name__)

EOS, LENGTH = "eos", "length"


@dataclass(frozen=True)
class Generation:
    """One generated continuation. `token_ids` excludes the prompt and the final EOS."""

    index: int
    token_ids: list[int]
    stopped: str  # "eos" or "length"


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a response: the model's generation config's and the tokenizer's."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for source in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        for i in source if isinstance(source, list | tuple) else [source]:
            if int(i) not in ids:
                ids.append(int(i))
    return ids


def pad_token_id(tokenizer, eos_ids: Sequence[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if eos_ids:
        return int(eos_ids[0])
    return 0


def has_quantized_layers(model) -> bool:
    """True when the model holds qdiablo's packed `QuantLinear` layers."""
    return any(
        type(m).__name__ == "QuantLinear" and type(m).__module__.startswith("quantizers")
        for m in model.modules()
    )


@contextlib.contextmanager
def inference_context(model, dequant_cache: bool = True) -> Iterator[None]:
    """No autograd, eval mode, and (with `dequant_cache`) quantized weights dequantized once for
    the whole block; without it each packed layer dequantizes per call."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _dequantized_once(model, dequant_cache):
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _dequantized_once(model, enabled: bool) -> Iterator[None]:
    if not enabled or not has_quantized_layers(model):
        yield
        return
    with dequantize_cache(model):
        yield


def dequantized_bytes(model, dtype: torch.dtype) -> int:
    """Bytes of a float copy of every packed layer in `dtype` (what the cache holds)."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(
        m.in_features * m.out_features * size
        for m in model.modules()
        if type(m).__name__ == "QuantLinear" and type(m).__module__.startswith("quantizers")
    )


DEQUANT_CACHE_SHARE = 0.5
"""`--dequant-cache auto` keeps the whole-model dequantized copy only when it takes at most this
share of the memory free on the evaluation device once the model is loaded (the GPU's free
memory, or the host's available memory), leaving the rest to the KV cache and the activations."""


def dequant_cache_fits(model, dtype: torch.dtype, free: int) -> tuple[bool, str]:
    """Whether `auto` keeps the dequantized copy, and why (a line for the log)."""
    need = dequantized_bytes(model, dtype)
    fits = need <= DEQUANT_CACHE_SHARE * free
    verdict = "kept" if fits else "not kept: each layer dequantizes per call"
    return fits, (
        f"dequantized copy of the packed layers: {need / 2**30:.2f} GiB against "
        f"{free / 2**30:.1f} GiB free ({DEQUANT_CACHE_SHARE:.0%} allowed): {verdict}"
    )


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id prompts left-padded into (input_ids, attention_mask) on `device`."""
    batch = pad_batch([{"input_ids": p} for p in prompts], pad_id, side="left")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def greedy_batch(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
) -> list[tuple[list[int], str]]:
    """Greedy-decode one batch with a KV cache, dropping each row as soon as it emits EOS.

    Returns, per prompt in input order, the generated ids (EOS excluded) and why it stopped.
    Call it inside `inference_context(model)`.
    """
    from transformers import DynamicCache  # deferred: seconds to import

    if any(len(p) == 0 for p in prompts):
        raise ValueError("cannot generate from an empty prompt")
    device = _device(model)
    ids, mask = left_pad(prompts, pad_token_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
    out_tokens: list[list[int]] = [[] for _ in prompts]
    stopped = [LENGTH] * len(prompts)
    if max_new_tokens <= 0:
        return [(t, s) for t, s in zip(out_tokens, stopped)]

    cache = DynamicCache(config=model.config)
    cache_arg = {cache_keyword(model): cache}
    alive = torch.arange(len(prompts), device=device)  # original row of each cache row
    next_pos = positions[:, -1] + 1
    logits = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        **cache_arg,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1, :]
    for step in range(max_new_tokens):
        token = logits.argmax(dim=-1)
        done = torch.isin(token, eos) if eos.numel() else torch.zeros_like(token, dtype=torch.bool)
        for row, t, d in zip(alive.tolist(), token.tolist(), done.tolist()):
            if d:
                stopped[row] = EOS
            else:
                out_tokens[row].append(t)
        if step == max_new_tokens - 1:
            break
        if bool(done.any()):
            keep = (~done).nonzero(as_tuple=True)[0]
            if keep.numel() == 0:
                break
            cache.batch_select_indices(keep)
            alive, token, mask, next_pos = alive[keep], token[keep], mask[keep], next_pos[keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        logits = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
            **cache_arg,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1, :]
        next_pos = next_pos + 1
    return [(t, s) for t, s in zip(out_tokens, stopped)]


def cache_keyword(model) -> str:
    """The forward argument that takes the KV cache: `cache` in the transformers releases that
    deprecate `past_key_values` (removal announced for 5.40), `past_key_values` before them.
    Read from the innermost model's signature (adapter wrappers pass keywords through)."""
    import inspect

    base = model
    for _ in range(4):
        getter = getattr(base, "get_base_model", None)
        inner = getter() if callable(getter) else None
        if inner is None or inner is base:
            break
        base = inner
    try:
        parameters = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def beam_batch(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    num_beams: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
) -> list[tuple[list[int], str]]:
    """Beam search on one left-padded batch through `model.generate` (deterministic)."""
    device = _device(model)
    ids, mask = left_pad(prompts, pad_token_id, device)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=False,
        eos_token_id=list(eos_token_ids) or None,
        pad_token_id=pad_token_id,
        use_cache=True,
    )
    eos = set(eos_token_ids)
    results = []
    for row in out[:, ids.shape[1] :].tolist():
        tokens, stop = [], LENGTH
        for t in row:
            if t in eos:
                stop = EOS
                break
            tokens.append(t)
        results.append((tokens, stop))
    return results


def batch_order(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (stable for ties)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def iter_generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    max_new_tokens: int = 512,
    num_beams: int = 1,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "generating",
    dequant_cache: bool = True,
) -> Iterator[list[Generation]]:
    """Generate for every prompt in length-sorted batches, yielding each batch's results.

    Results come batch by batch (not in input order), so that a caller can save them as it goes.
    """
    bar = tqdm(total=len(prompts), desc=desc, unit="ex", disable=not progress, leave=False)
    try:
        with inference_context(model, dequant_cache):
            for batch in batch_order(prompts, batch_size):
                chunk = [prompts[i] for i in batch]
                kwargs = dict(
                    max_new_tokens=max_new_tokens,
                    eos_token_ids=eos_token_ids,
                    pad_token_id=pad_token_id,
                )
                if num_beams > 1:
                    outs = beam_batch(model, chunk, num_beams=num_beams, **kwargs)
                else:
                    outs = greedy_batch(model, chunk, **kwargs)
                yield [Generation(i, t, s) for i, (t, s) in zip(batch, outs)]
                bar.update(len(batch))
    finally:
        bar.close()


def generate(model, prompts: Sequence[Sequence[int]], **kwargs) -> list[Generation]:
    """`iter_generate`, collected back into input order."""
    results: list[Generation | None] = [None] * len(prompts)
    for batch in iter_generate(model, prompts, **kwargs):
        for g in batch:
            results[g.index] = g
    return results  # type: ignore[return-value]
