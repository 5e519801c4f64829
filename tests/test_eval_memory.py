"""Evaluation on a packed base without a whole-model dequantized copy (issue 19): with the cache
off each packed layer dequantizes per call, the outputs are the same bit for bit, and the
memory a generation allocates is one layer's float weight, the KV cache, the logits and the
prefill's activations (the planner's eval formula), far below the copy the cache holds."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import make_tiny_llama
from live_bytes import LiveBytes

from eval.generate import dequant_cache_fits, dequantized_bytes, generate
from eval.nll import reference_nll
from qdiablo.data import MathRecord
from qdiablo.memory.activations import Dtypes, eval_activations
from qdiablo.memory.shapes import ModelShape
from quantizers import QuantConfig, QuantLinear, quantize_model

PROMPTS = ["What is 2 + 3?", "Tom has 4 apples and buys 7 more. How many?", "12 * 12 =", "Why?"]
NEW = 12


@pytest.fixture(scope="module")
def packed():
    model = make_tiny_llama(seed=1, hidden=128, intermediate=352, layers=10, init_range=0.2)
    logging.disable(logging.INFO)
    try:
        quantize_model(model, None, QuantConfig(method="rtn", bits=4, group_size=32))
    finally:
        logging.disable(logging.NOTSET)
    return model


def run(model, prompts, cache: bool):
    return generate(
        model,
        prompts,
        eos_token_ids=[],
        pad_token_id=0,
        max_new_tokens=NEW,
        batch_size=len(prompts),
        progress=False,
        dequant_cache=cache,
    )


def test_the_same_outputs_with_and_without_the_cache(packed, tokenizer):
    prompts = [tokenizer(t)["input_ids"] for t in PROMPTS]
    on, off = run(packed, prompts, True), run(packed, prompts, False)
    assert [g.token_ids for g in on] == [g.token_ids for g in off]
    records = [MathRecord(t, "The answer is 5.", "5") for t in PROMPTS]
    kw = dict(template="alpaca", progress=False)
    nll_on = reference_nll(packed, tokenizer, records, dequant_cache=True, **kw)
    nll_off = reference_nll(packed, tokenizer, records, dequant_cache=False, **kw)
    assert [i.nll_sum for i in nll_on] == [i.nll_sum for i in nll_off]


def test_without_the_cache_a_generation_holds_one_layer_not_the_model(packed, tokenizer):
    prompts = [tokenizer(t)["input_ids"] for t in PROMPTS]
    with LiveBytes(packed) as off:
        run(packed, prompts, False)
    with LiveBytes(packed) as on:
        run(packed, prompts, True)
    copy = dequantized_bytes(packed, torch.float32)
    assert on.peak >= copy  # the cache: every packed layer in float32
    largest = max(
        m.in_features * m.out_features for m in packed.modules() if isinstance(m, QuantLinear)
    )
    shape = ModelShape.from_config(packed.config, "tiny")
    longest = max(len(p) for p in prompts)
    bound = eval_activations(shape, Dtypes(4, 4), len(prompts), longest, NEW, 8 * largest)
    assert off.peak <= bound.total, (off.peak, bound)
    assert off.peak < copy / 3  # far from a whole-model copy


def test_auto_keeps_the_copy_only_within_half_the_free_memory(packed):
    need = dequantized_bytes(packed, torch.bfloat16)
    assert dequant_cache_fits(packed, torch.bfloat16, 2 * need)[0]
    fits, why = dequant_cache_fits(packed, torch.bfloat16, 2 * need - 1)
    assert not fits and "per call" in why
