"""The smooth metric: teacher-forced NLL of each test record's reference response.

Accuracy sits near zero for small models (SmolLM2-135M-Instruct scores 0/30 on SVAMP), so it
cannot rank methods at that size. The mean per-token negative log-likelihood of a reference
response, after the same prompt the model is evaluated with, moves smoothly with the model's
quality.

- The reference response is the record's `output` (stripped), or "The answer is {answer}." when
  it is empty (mawps); `reference="answer"` uses that sentence for every set
  (`qdiablo.data.reference_response`).
- Tokens exactly as in training (`qdiablo.data.encode_example`): the prompt and the response are
  tokenized separately, EOS is appended, and only the response tokens and the EOS are scored.
- A task's NLL is the token-weighted mean over its examples (sum of NLL / number of tokens), and
  its perplexity is exp of that.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from eval.generate import batch_order, inference_context
from qdiablo.data import IGNORE_INDEX, MathRecord, encode_example, pad_batch, reference_response

DEFAULT_MAX_LENGTH = 2048
_CHUNK = 256  # positions per float64 cross-entropy chunk


@dataclass(frozen=True)
class TokenNLL:
    """The summed NLL (nats) of one reference response, and how many tokens it covers."""

    index: int
    nll_sum: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else float("nan")


def encode_references(
    tokenizer,
    records: Sequence[MathRecord],
    template: str,
    reference: str = "output",
    max_length: int = DEFAULT_MAX_LENGTH,
) -> list[dict[str, list[int]]]:
    """Prompt + reference response + EOS per record, labels on the response only."""
    return [
        encode_example(
            tokenizer, r, template, max_length=max_length, response=reference_response(r, reference)
        )
        for r in records
    ]


def batch_nll(model, examples: Sequence[dict[str, list[int]]], pad_token_id: int) -> list[tuple]:
    """(summed NLL, token count) per example of one batch; call inside `inference_context`.

    Rows are left-padded, so every response ends at the last column, and the logits are computed
    only for the last columns that predict a response token (`logits_to_keep`): the vocabulary
    projection is the costly part for a small model with a large vocabulary.
    """
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    batch = {k: v.to(device) for k, v in pad_batch(examples, pad_token_id, side="left").items()}
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    scored = labels != IGNORE_INDEX
    if not bool(scored.any()):
        return [(0.0, 0)] * len(examples)
    # The first scored column of any row; logits at column c predict the token at c + 1.
    first = int(scored.float().argmax(dim=-1)[scored.any(dim=-1)].min())
    keep = ids.shape[1] - first + 1
    logits = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=False,
        logits_to_keep=keep,
    ).logits[:, :-1, :]
    targets = ids[:, ids.shape[1] - logits.shape[1] :]
    target_scored = scored[:, ids.shape[1] - logits.shape[1] :]
    # Cross-entropy in float64 on the scored positions only, in chunks to bound memory. In
    # float32 the sum over a 49k vocabulary drops the long tail of unlikely tokens: up to ~1e-4
    # nats per token with a 3-D cross_entropy on CPU, ~1e-5 with a 2-D one.
    rows = target_scored.nonzero(as_tuple=True)
    token_nll = torch.cat(
        [
            torch.nn.functional.cross_entropy(
                logits[rows[0][i : i + _CHUNK], rows[1][i : i + _CHUNK]].double(),
                targets[rows[0][i : i + _CHUNK], rows[1][i : i + _CHUNK]],
                reduction="none",
            )
            for i in range(0, rows[0].numel(), _CHUNK)
        ]
    )
    nll = torch.zeros(len(examples), dtype=torch.float64, device=device)
    nll.index_add_(0, rows[0], token_nll)
    counts = target_scored.sum(dim=-1)
    return [(float(s), int(c)) for s, c in zip(nll.tolist(), counts.tolist())]


def iter_reference_nll(
    model,
    tokenizer,
    records: Sequence[MathRecord],
    *,
    template: str,
    reference: str = "output",
    batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    progress: bool = True,
    desc: str = "reference NLL",
    dequant_cache: bool = True,
) -> Iterator[list[TokenNLL]]:
    """Teacher-forced NLL of each record's reference response, yielded batch by batch."""
    examples = encode_references(tokenizer, records, template, reference, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=len(examples), desc=desc, unit="ex", disable=not progress, leave=False)
    try:
        with inference_context(model, dequant_cache):
            for batch in batch_order([e["input_ids"] for e in examples], batch_size):
                sums = batch_nll(model, [examples[i] for i in batch], pad)
                yield [TokenNLL(i, s, c) for i, (s, c) in zip(batch, sums)]
                bar.update(len(batch))
    finally:
        bar.close()


def reference_nll(model, tokenizer, records: Sequence[MathRecord], **kwargs) -> list[TokenNLL]:
    """`iter_reference_nll`, collected in record order."""
    out: list[TokenNLL | None] = [None] * len(records)
    for batch in iter_reference_nll(model, tokenizer, records, **kwargs):
        for item in batch:
            out[item.index] = item
    return out  # type: ignore[return-value]


def aggregate(items: Sequence[TokenNLL]) -> dict[str, float | int]:
    """Token-weighted mean NLL and its perplexity over a task's examples."""
    total = sum(i.nll_sum for i in items)
    tokens = sum(i.tokens for i in items)
    mean = total / tokens if tokens else float("nan")
    return {
        "nll": mean,
        "ppl": math.exp(mean) if tokens and mean < 700 else float("inf"),
        "tokens": tokens,
    }
