"""Matched trainable-parameter budgets (docs/diablo.md §4), checked against published figures
and the counts of the real adapters."""

import pytest
from conftest import make_tiny_llama

from qdiablo.adapters.budget import (
    diablo_parameters,
    lora_parameters,
    matched_num_blocks,
    matched_rank,
    resolve_budget,
    valid_num_blocks,
)
from qdiablo.adapters.common import adapted_layers, layer_shapes
from qdiablo.adapters.common import trainable_parameters as count
from qdiablo.adapters.diablo import attach_diablo
from qdiablo.adapters.lora import attach_lora
from qdiablo.adapters.registry import get_adapter
from qdiablo.errors import UserError

# LLaMA-7B, q,k,v,up,down over 32 decoder layers.
LLAMA7B = [(4096, 4096)] * 3 + [(4096, 11008), (11008, 4096)]
LLAMA7B = LLAMA7B * 32
# SmolLM2-135M: hidden 576, GQA kv out 192, intermediate 1536, 30 layers.
SMOLLM2 = ([(576, 576), (576, 192), (576, 192), (576, 1536), (1536, 576)]) * 30


def test_llama7b_figures_from_the_design():
    assert round(diablo_parameters(LLAMA7B, 64) / 1e6, 1) == 70.3
    assert matched_rank(LLAMA7B, 64) == 40
    assert round(lora_parameters(LLAMA7B, 32) / 1e6, 1) == 56.1
    assert round(lora_parameters(LLAMA7B, 64) / 1e6) == 112


def test_matched_rank_is_the_rounded_ratio():
    n = 64
    ratio = sum(i * o / n for i, o in SMOLLM2) / sum(i + o for i, o in SMOLLM2)
    assert matched_rank(SMOLLM2, n) == round(ratio)
    assert matched_rank(SMOLLM2, 64) == 5  # 1,088,640 / 207,360 per rank = 5.25


def test_matched_num_blocks_is_the_nearest_valid_n():
    n = matched_num_blocks(SMOLLM2, 5)
    assert n in valid_num_blocks(SMOLLM2)
    target = lora_parameters(SMOLLM2, 5)
    best = min(abs(diablo_parameters(SMOLLM2, v) - target) for v in valid_num_blocks(SMOLLM2))
    assert abs(diablo_parameters(SMOLLM2, n) - target) == best
    assert valid_num_blocks([(576, 192), (1536, 576)]) == [
        *(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 192)
    ]


def test_resolve_budget_paper_and_matched_settings():
    paper = resolve_budget(SMOLLM2, "num_blocks", None, None, match_params=False)
    assert (paper.num_blocks, paper.rank) == (64, 64)
    matched = resolve_budget(SMOLLM2, "rank", 64, None, match_params=True)
    assert matched.rank == 5
    assert matched.lora_parameters == lora_parameters(SMOLLM2, 5)
    assert matched.diablo_parameters == diablo_parameters(SMOLLM2, 64)
    assert (matched.matched_rank, matched.matched_num_blocks) == (5, 64)
    assert paper.matched_rank == 5 and paper.matched_num_blocks == matched_num_blocks(SMOLLM2, 64)
    assert get_adapter("lora").matched(matched, SMOLLM2) == {
        "adapter": "diablo",
        "num_blocks": 64,
        "trainable_parameters": diablo_parameters(SMOLLM2, 64),
    }
    assert get_adapter("diablo").matched(paper, SMOLLM2) == {
        "adapter": "lora",
        "rank": 5,
        "trainable_parameters": lora_parameters(SMOLLM2, 5),
    }
    back = resolve_budget(SMOLLM2, "num_blocks", None, 5, match_params=True)
    assert back.num_blocks == matched_num_blocks(SMOLLM2, 5)
    with pytest.raises(UserError, match="give only one"):
        resolve_budget(SMOLLM2, "num_blocks", 64, 7, match_params=True)


def test_invalid_n_is_refused_for_diablo_but_recorded_as_none_for_lora():
    with pytest.raises(UserError, match="does not divide"):
        resolve_budget([(64, 32)], "num_blocks", 64, None, match_params=False)
    budget = resolve_budget([(64, 32)], "rank", 64, 4, match_params=False)
    assert budget.diablo_parameters is None and budget.lora_parameters == 4 * 96


def test_pad_policy_counts_padded_blocks():
    assert diablo_parameters([(10, 7)], 4, "pad") == 4 * 3 * 2


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "down_proj"], "all-linear"])
def test_budget_counts_equal_the_real_adapters(targets):
    shapes = layer_shapes(adapted_layers(make_tiny_llama(), targets))
    diablo = attach_diablo(make_tiny_llama(), 16, targets, dropout=0.0)
    assert count(diablo) == diablo_parameters(shapes, 16)
    lora = attach_lora(make_tiny_llama(), 5, 10, targets, dropout=0.0)
    assert count(lora) == lora_parameters(shapes, 5)
