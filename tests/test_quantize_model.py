"""quantize_model on tiny LLaMA models: block-wise calibration, what gets replaced, the report."""

import copy

import pytest
import torch
from conftest import make_tiny_llama, make_tokenizer

from quantizers import QuantConfig, QuantLinear, quantize_model, tokenize_calibration
from quantizers.calibration import (
    block_linears,
    capture_block_inputs,
    collect_hessians,
    find_decoder_blocks,
    input_groups,
)

TEXT = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether in April and May? "
)


def calibration(samples=16, seq_len=64):
    return tokenize_calibration(make_tokenizer(), [TEXT * 4] * 12, samples, seq_len, batch_size=4)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_tokenize_calibration_packs_windows():
    tok = make_tokenizer()
    batches = tokenize_calibration(tok, [TEXT] * 10, num_samples=5, seq_len=32, batch_size=2)
    assert [tuple(b.shape) for b in batches] == [(2, 32), (2, 32), (1, 32)]
    assert all(b.dtype == torch.long for b in batches)
    with pytest.raises(ValueError, match="fewer than one window of 4096"):
        tokenize_calibration(tok, ["short"], 4, 4096)


def test_hessians_of_the_first_block_match_a_full_forward():
    model = make_tiny_llama()
    calib = calibration()
    _, blocks = find_decoder_blocks(model)
    hidden, kwargs = capture_block_inputs(model, blocks, calib, torch.device("cpu"))
    linears = block_linears(blocks[0], "model.layers.0")
    groups = input_groups(blocks[0], linears, hidden[0], kwargs[0])
    assert groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    H = collect_hessians(blocks[0], linears, groups, hidden, kwargs)
    # Independent: hook the layers during ordinary full-model forwards.
    seen = {"self_attn.q_proj": [], "mlp.down_proj": []}
    handles = [
        blocks[0]
        .get_submodule(n)
        .register_forward_hook(
            lambda _m, args, _o, n=n: seen[n].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for n in seen
    ]
    for batch in calib:
        logits(model, batch)
    for h in handles:
        h.remove()
    for name, xs in seen.items():
        X = torch.cat(xs).double()
        expected = X.t() @ X / X.shape[0]
        assert torch.allclose(H[name].double(), expected, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(bits=4, group_size=32),
        QuantConfig(bits=3, group_size=-1, magr=True, cd_sweeps=1, true_sequential=False),
        QuantConfig(bits=2, group_size=32, desc_act=True, checkpoint_format="gptq_v2"),
    ],
    ids=["gptq4", "magr-gptq3-cd", "gptq2-act"],
)
def test_quantize_model_replaces_block_linears_only(config):
    model = make_tiny_llama()
    reference = copy.deepcopy(model)
    embed, head = model.model.embed_tokens, model.lm_head
    out = quantize_model(model, calibration(), config)
    assert out is model
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 14 and all(n.startswith("model.layers.") for n in quantized)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    assert model.model.embed_tokens is embed and model.lm_head is head
    assert torch.equal(head.weight, reference.lm_head.weight)
    report = model.quantization_report
    assert sorted(r.name for r in report.layers) == sorted(quantized)
    assert all(0 < r.rel_error < 1 for r in report.layers)
    assert (report.layers[0].max_abs_after is not None) == config.magr
    if config.magr:
        assert all(r.max_abs_after < r.max_abs_before for r in report.layers)
    assert "| model.layers.0.self_attn.q_proj | 64×64 |" in report.to_markdown()
    assert model.config.quantization_config["bits"] == config.bits
    ids = calibration()[0]
    a, b = logits(reference, ids), logits(model, ids)
    assert float((a - b).norm() / a.norm()) < {4: 0.1, 3: 0.3, 2: 0.6}[config.bits]


def test_eight_bit_is_nearly_lossless_and_gptq_beats_rtn():
    model = make_tiny_llama(seed=1, hidden=128, intermediate=256)
    ids = calibration()[0]
    ref = logits(model, ids)
    errors = {}
    for name, config in {
        "rtn8": QuantConfig(method="rtn", bits=8, group_size=32),
        "rtn3": QuantConfig(method="rtn", bits=3, group_size=-1),
        "gptq3": QuantConfig(bits=3, group_size=-1),
    }.items():
        m = quantize_model(copy.deepcopy(model), calibration(), config)
        errors[name] = float((logits(m, ids) - ref).norm() / ref.norm())
        layer_errors = [r.rel_error for r in m.quantization_report.layers]
        errors[name + " layers"] = sum(layer_errors) / len(layer_errors)
    assert errors["rtn8"] < 0.01
    assert errors["gptq3 layers"] < 0.8 * errors["rtn3 layers"], errors


def test_rtn_needs_no_calibration_but_gptq_does():
    model = quantize_model(make_tiny_llama(), None, QuantConfig(method="rtn", bits=4))
    assert all(r.rel_error is None for r in model.quantization_report.layers)
    with pytest.raises(ValueError, match="non-empty list of LongTensor"):
        quantize_model(make_tiny_llama(), None, QuantConfig(bits=4))
    with pytest.raises(ValueError, match=r"calib_data\[1\] must be a LongTensor"):
        quantize_model(
            make_tiny_llama(),
            [torch.zeros(2, 8, dtype=torch.long), torch.zeros(3)],
            QuantConfig(bits=4),
        )


def test_unpackable_layer_is_named_before_any_work():
    model = make_tiny_llama(hidden=48, intermediate=96, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: in_features=48"):
        quantize_model(model, calibration(), QuantConfig(bits=3))


def test_quantized_model_trains_only_what_is_trainable():
    model = quantize_model(make_tiny_llama(), calibration(), QuantConfig(bits=4, group_size=32))
    ids = calibration()[0]
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert model.lm_head.weight.grad is not None
    assert all(
        not b.requires_grad
        for m in model.modules()
        if isinstance(m, QuantLinear)
        for b in m.buffers()
    )


@pytest.mark.parametrize(
    "kw",
    [
        dict(bits=5),
        dict(group_size=48),
        dict(group_size=0),
        dict(method="awq"),
        dict(damp_percent=0),
        dict(beta=1.5),
        dict(checkpoint_format="gptq_v3"),
        dict(method="rtn", desc_act=True),
        dict(magr_iters=0),
        dict(bits=True),
    ],
)
def test_quant_config_validation_names_the_field(kw):
    field = next(k for k in kw if k != "method" or len(kw) == 1)
    with pytest.raises(ValueError, match=f"QuantConfig.*{field}"):
        QuantConfig(**kw)


def test_quant_config_defaults_and_beta_table():
    c = QuantConfig(bits=2, group_size=-1, magr=True)
    assert (c.resolved_beta, c.resolved_magr_alpha) == (0.8, 1e-3)
    assert QuantConfig(bits=3, group_size=-1, magr=True).resolved_beta == 0.9
    assert QuantConfig(bits=2, group_size=128, magr=True).resolved_beta == 0.8
    assert QuantConfig(bits=2, group_size=64, magr=True).resolved_magr_alpha == 1e-4
    assert QuantConfig(bits=3, group_size=64, magr=True).resolved_beta == 0.9
    assert QuantConfig(bits=4, group_size=64, magr=True).resolved_beta == 1.0
    assert QuantConfig(bits=2, group_size=-1).resolved_beta == 1.0  # β only with MagR
    assert QuantConfig(beta=0.7).resolved_beta == 0.7
    c = QuantConfig(bits=3)
    assert QuantConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match=r"unknown fields.*'nbits'"):
        QuantConfig.from_dict({"nbits": 3})


def test_bfloat16_calibration_matches_float32_closely():
    model = make_tiny_llama(seed=2, hidden=128, intermediate=256)
    config = QuantConfig(bits=3, group_size=32)
    full = quantize_model(copy.deepcopy(model), calibration(), config)
    half = quantize_model(copy.deepcopy(model), calibration(), config, calib_dtype=torch.bfloat16)
    e_full = [r.rel_error for r in full.quantization_report.layers]
    e_half = [r.rel_error for r in half.quantization_report.layers]
    # the errors are measured against each run's own Hessians; they agree closely
    assert sum(e_half) == pytest.approx(sum(e_full), rel=0.05)
    with pytest.raises(ValueError, match="calib_dtype must be"):
        quantize_model(copy.deepcopy(model), calibration(), config, calib_dtype="half")
