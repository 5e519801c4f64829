"""Perplexity of a causal LM on a token stream: the standard GPTQ-paper measurement.

Texts are tokenized, joined with EOS and cut into non-overlapping windows of `seq_len` tokens
(`quantizers.calibration.token_windows`, the same rule as the calibration windows);
perplexity is exp(mean next-token NLL) over every predicted token. Quantized models run inside
`dequantize_cache`, so each packed layer is dequantized once, not per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qdiablo.data import load_test_set
from quantizers import dequantize_cache
from quantizers.calibration import token_windows

__all__ = ["PerplexityResult", "math10k_texts", "perplexity", "token_windows"]


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens


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
