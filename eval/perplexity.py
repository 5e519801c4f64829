"""Perplexity of a causal LM on a token stream: the standard GPTQ-paper measurement.

Texts are tokenized, joined with EOS and cut into non-overlapping windows of `seq_len` tokens;
perplexity is exp(mean next-token NLL) over every predicted token. Quantized models run inside
`dequantize_cache`, so each packed layer is dequantized once, not per batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qdiablo.data import load_test_set
from quantizers import dequantize_cache


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens


def token_windows(
    tokenizer, texts: Iterable[str], seq_len: int = 256, max_tokens: int | None = None
) -> torch.Tensor:
    """Tokenize texts (EOS between them) into a LongTensor [windows, seq_len]."""
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


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> PerplexityResult:
    """Perplexity of `model` on token windows [N, T] (every token but the first of each window
    is predicted)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with dequantize_cache(model):
            for batch in windows.split(batch_size):
                batch = batch.to(device)
                logits = model(batch, use_cache=False).logits.float()
                nll = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    batch[:, 1:].reshape(-1),
                    reduction="sum",
                )
                total += float(nll)
                count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    mean = total / count
    return PerplexityResult(math.exp(mean), mean, count)


def math10k_texts(name: str, with_output: bool = True) -> list[str]:
    """Texts from a vendored Math10K test set: the question, plus the file's worked solution
    when `with_output`. Those solutions are model-written rationales (and may be wrong): fine as
    text to measure perplexity on, never to train on."""
    texts = []
    for r in load_test_set(name):
        text = r.instruction.strip()
        if with_output and r.output.strip():
            text += "\n" + r.output.strip()
        texts.append(text)
    return texts
