"""Frozen bases (fp / nf4 / nf2) and DiaBlo on packed bitsandbytes layers."""

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn
from transformers import AutoModelForCausalLM

from qdiablo import DiaBloConfig, get_diablo_model
from qdiablo.adapters.diablo import attach_diablo
from qdiablo.adapters.lora import attach_lora
from qdiablo.diablo.fingerprint import base_fingerprint
from qdiablo.diablo.targets import find_targets
from qdiablo.errors import UserError
from qdiablo.nf4 import bnb_nf4_config, quantize_bnb_4bit_
from qdiablo.train.bases import load_training_base
from qdiablo.train.metrics import base_linear_bytes, layer_resident_bytes


@pytest.fixture
def bnb():
    """bitsandbytes (the `qlora` extra); the tests that need it skip where it is missing."""
    return pytest.importorskip("bitsandbytes")


def _linear4bit_layers(model, bnb):
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_inplace_nf4_equals_from_pretrained(tiny_model_dir, bnb):
    """The GGUF path (float load + swap) builds the same packed layers as from_pretrained."""
    config = bnb_nf4_config(torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=config, device_map={"": "cpu"}
    )
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    names = quantize_bnb_4bit_(ours, config)
    ref_layers, our_layers = _linear4bit_layers(reference, bnb), _linear4bit_layers(ours, bnb)
    assert sorted(names) == sorted(ref_layers) == sorted(our_layers)
    assert "lm_head" not in names and type(ours.lm_head) is nn.Linear
    for name in names:
        a, b = ref_layers[name].weight, our_layers[name].weight
        assert torch.equal(a.data, b.data), name
        sa, sb = a.quant_state.as_dict(packed=True), b.quant_state.as_dict(packed=True)
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert torch.equal(sa[key], sb[key]), (name, key)
            else:
                assert sa[key] == sb[key], (name, key)
    ids = torch.randint(0, 250, (2, 12))
    torch.testing.assert_close(reference(ids).logits, ours(ids).logits, atol=0, rtol=0)
    assert ours.is_loaded_in_4bit and ours.config.quantization_config.bnb_4bit_use_double_quant


def test_nf4_fingerprint_is_the_same_on_both_load_paths(tiny_model_dir, bnb):
    """An adapter trained on a GGUF model quantized in place loads onto the same model quantized
    by from_pretrained (evaluation's path), and vice versa."""
    inplace = make_tiny_llama(seed=0)  # the weights saved in tiny_model_dir, never saved itself
    quantize_bnb_4bit_(inplace, bnb_nf4_config(torch.float32))
    loaded = load_training_base("nf4", str(tiny_model_dir)).model
    targets = find_targets(inplace, DiaBloConfig())
    assert base_fingerprint(inplace, targets) == base_fingerprint(loaded, targets)
    assert base_fingerprint(inplace, targets) != base_fingerprint(make_tiny_llama(seed=0), targets)


def _dequantized_copy(layer: nn.Module) -> nn.Linear:
    import bitsandbytes.functional as bnbf

    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    dense.weight.data = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    dense.weight.requires_grad_(False)
    return dense


def test_diablo_gradients_on_linear4bit_equal_those_on_dequantized_linear(bnb):
    """The blocks see exactly the dequantized weights: same loss, same block gradients."""
    torch.manual_seed(0)
    packed = make_tiny_llama(seed=3)
    quantize_bnb_4bit_(packed, bnb_nf4_config(torch.float32))
    dense = make_tiny_llama(seed=3)
    for name, layer in _linear4bit_layers(packed, bnb).items():
        dense.set_submodule(name, _dequantized_copy(layer))
    config = DiaBloConfig(num_blocks=8, dropout=0.0)
    packed_d, dense_d = get_diablo_model(packed, config), get_diablo_model(dense, config)
    for (_, a), (_, b) in zip(packed_d.diablo_layers(), dense_d.diablo_layers()):
        blocks = torch.randn_like(a.blocks) * 0.05
        a.blocks.data.copy_(blocks)
        b.blocks.data.copy_(blocks)
    ids = torch.randint(0, 250, (2, 20))
    loss_p = packed_d(input_ids=ids, labels=ids).loss
    loss_d = dense_d(input_ids=ids, labels=ids).loss
    loss_p.backward()
    loss_d.backward()
    torch.testing.assert_close(loss_p, loss_d, atol=1e-5, rtol=1e-5)
    for (name, a), (_, b) in zip(packed_d.diablo_layers(), dense_d.diablo_layers()):
        assert a.blocks.grad.abs().sum() > 0
        torch.testing.assert_close(a.blocks.grad, b.blocks.grad, atol=1e-6, rtol=1e-4, msg=name)
        assert isinstance(a.base_layer, bnb.nn.Linear4bit)
        assert a.base_layer.weight.dtype == torch.uint8 and a.base_layer.weight.grad is None


def test_nf4_base_is_packed_and_smaller(tiny_model_dir, bnb):
    fp = load_training_base("fp", str(tiny_model_dir))
    nf4 = load_training_base("nf4", str(tiny_model_dir))
    assert not any(p.requires_grad for p in nf4.model.parameters())
    fp_bytes, nf4_bytes = base_linear_bytes(fp.model), base_linear_bytes(nf4.model)
    assert fp_bytes["layers"] == nf4_bytes["layers"] == 14
    assert fp_bytes["weights"] == nf4_bytes["weights"]
    # 4 bits per weight, plus 8-bit absmax per 64 and bitsandbytes' lookup tables (~1 KiB per
    # layer, which dominates only for layers as tiny as these)
    assert 0.125 * fp_bytes["bytes"] < nf4_bytes["bytes"] < 0.2 * fp_bytes["bytes"]
    q = nf4.model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.uint8 and q.weight.numel() == q.in_features * q.out_features // 2
    assert layer_resident_bytes(q) > q.weight.numel()


@pytest.mark.parametrize("adapter", ["diablo", "lora"])
def test_base_bytes_ignore_the_adapter(tiny_model_dir, adapter, bnb):
    if adapter == "lora":
        pytest.importorskip("peft")
    nf4 = load_training_base("nf4", str(tiny_model_dir))
    before = base_linear_bytes(nf4.model)
    if adapter == "diablo":
        wrapped = attach_diablo(nf4.model, 8, ["q_proj", "up_proj"], dropout=0.0)
    else:
        wrapped = attach_lora(nf4.model, 4, 8, ["q_proj", "up_proj"], dropout=0.0)
    assert base_linear_bytes(wrapped) == before


def test_nf2_base_records_its_quantization(tiny_model_dir):
    nf2 = load_training_base("nf2", str(tiny_model_dir))
    assert nf2.model.config.quantization_config["bits"] == 2
    w = nf2.model.model.layers[1].mlp.down_proj.weight
    assert all(row.unique().numel() <= 4 for row in w.reshape(-1, 64))
    assert "NF2" in nf2.description


def test_unknown_base_and_missing_model_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="unknown base 'int3'"):
        load_training_base("int3", "smollm2")
    with pytest.raises(UserError, match=r"^not found: .*nowhere$"):  # at once, no hub call
        load_training_base("fp", str(tmp_path / "nowhere"))
