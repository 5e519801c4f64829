"""NormalFloat levels and quantization (the NF2-LoRA baseline's base), against bitsandbytes' NF4
and against QLoRA/LoftQ's construction computed independently with scipy."""

import pytest
import torch
from conftest import make_tiny_llama
from scipy.stats import norm

from qdiablo.nf import (
    fake_quantize_model_nf,
    nf_dequantize,
    nf_fake_quantize,
    nf_levels,
    nf_quantize,
)

OFFSET = 0.9677083


def loftq_levels(bits: int) -> list[float]:
    """LoftQ's asymmetric NormalFloat construction, written out with scipy."""
    n = 2**bits
    pos = norm.ppf(torch.linspace(OFFSET, 0.5, n // 2 + 1)[:-1].numpy()).tolist()
    neg = (-norm.ppf(torch.linspace(OFFSET, 0.5, n // 2)[:-1].numpy())).tolist()
    values = sorted([*pos, 0.0, *neg])
    return [v / max(values) for v in values]


def test_nf4_levels_are_bitsandbytes_nf4_table():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    table = bnbf.get_4bit_type("nf4", device="cpu").float()
    torch.testing.assert_close(nf_levels(4), table, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_levels_follow_the_normalfloat_construction(bits):
    torch.testing.assert_close(
        nf_levels(bits), torch.tensor(loftq_levels(bits), dtype=torch.float32), atol=1e-6, rtol=0
    )


def test_nf2_has_four_levels_with_exact_zero_and_ends():
    levels = nf_levels(2)
    assert levels.tolist()[0] == -1.0 and levels.tolist()[-1] == 1.0
    assert levels.numel() == 4 and (levels == 0).sum() == 1
    assert levels[2].item() == pytest.approx(0.3379, abs=1e-4)


def test_nf4_quantization_matches_bitsandbytes_blockwise():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    w = torch.randn(96, 128) * 0.02
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    reference = bnbf.dequantize_4bit(packed, state)
    codes, absmax = nf_quantize(w, bits=4, blocksize=64)
    torch.testing.assert_close(absmax, state.absmax.float(), atol=0, rtol=0)
    ours = nf_dequantize(codes, absmax, w.shape, bits=4, blocksize=64)
    torch.testing.assert_close(ours, reference, atol=1e-7, rtol=0)


def test_nf2_round_trip():
    torch.manual_seed(1)
    w = torch.randn(7, 100)  # 700 values: the last block of 64 is partial
    codes, absmax = nf_quantize(w, bits=2, blocksize=64)
    assert codes.max() <= 3 and absmax.numel() == 11
    deq = nf_dequantize(codes, absmax, w.shape, bits=2, blocksize=64)
    assert deq.shape == w.shape
    # every value is a level times its block's absmax, and the nearest one
    flat = torch.nn.functional.pad(w.reshape(-1), (0, 4)).view(-1, 64)
    grid = nf_levels(2).view(1, 1, 4) * absmax.view(-1, 1, 1)
    nearest = grid.expand(11, 64, 4).gather(
        2, (flat.unsqueeze(2) - grid).abs().argmin(2, keepdim=True)
    )
    torch.testing.assert_close(deq.reshape(-1), nearest.reshape(-1)[:700], atol=1e-6, rtol=0)
    # the largest magnitude of each block is represented exactly
    assert torch.allclose(deq.abs().reshape(-1).max(), w.abs().max())
    # quantizing the dequantized weight again changes nothing
    torch.testing.assert_close(nf_fake_quantize(deq, bits=2), deq, atol=1e-6, rtol=0)


def test_zero_block_stays_zero():
    w = torch.zeros(2, 64)
    assert torch.equal(nf_fake_quantize(w, bits=2), w)


def test_fake_quantize_model_leaves_head_and_embeddings_float():
    model = make_tiny_llama()
    head = model.lm_head.weight.clone()
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    names = fake_quantize_model_nf(model, bits=2)
    assert "lm_head" not in names and len(names) == 2 * 7
    assert torch.equal(model.lm_head.weight, head)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q, q_before)
    per_block = q.reshape(-1, 64)
    assert all(row.unique().numel() <= 4 for row in per_block)
    assert model.config.quantization_config["quant_method"] == "nf2-fake"
