"""`--train-scales`: per-group scale multipliers on packed layers, trained with the adapter.

The multiplier's gradient against a dense autograd reference; a folded layer computing bit for
bit what the trained one computed; and on a tiny model: train (DiaBlo and LoRA), save, reload for
evaluation, export (base/ with the scales in its GPTQ-layout tensors, read back by a plain GPTQ
unpacker), load_exported and merge, each bit for bit against the trained model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama, make_tokenizer
from safetensors.torch import load_file

from qdiablo.adapters.loading import load_adapter
from qdiablo.adapters.scales import SCALES_FILE
from qdiablo.errors import UserError
from qdiablo.export import export_model, load_exported
from qdiablo.export.merge import merge_into_dense
from qdiablo.models import load_packed
from quantizers import QuantConfig, QuantLinear, load_quantized, quantize_model, save_quantized
from quantizers.calibration import tokenize_calibration
from quantizers.rtn import MIN_SCALE, rtn_quantize
from quantizers.trained_scales import add_multipliers, fold_multipliers, multipliers

TEXT = "Natalia sold clips to 48 of her friends in April, and half as many clips in May.\n\n"
IDS = torch.tensor([[1, 72, 101, 108, 108, 111, 44, 32, 50, 43, 51, 61], [1, *range(60, 71)]])


def _layer(bits=2, group=32, seed=0) -> QuantLinear:
    torch.manual_seed(seed)
    W = torch.randn(64, 96)
    return QuantLinear.from_result(rtn_quantize(W, bits, group), group, torch.randn(64))


def test_multiplier_gradient_matches_a_dense_reference():
    layer = _layer()
    add_multipliers(layer)
    with torch.no_grad():
        layer.scale_multiplier.mul_(1 + 0.2 * torch.randn_like(layer.scale_multiplier))
    x = torch.randn(3, 5, 96, requires_grad=True)
    r = torch.randn(3, 5, 64)
    (layer(x) * r).sum().backward()
    # Reference: W = (q − z)·s with s the rounded scales as a leaf; ∂L/∂m = ∂L/∂s · s₀.
    s0 = layer.packed_tensors().scales.float()
    s = (s0 * layer.scale_multiplier.detach()).clamp(min=MIN_SCALE).half().float()
    s.requires_grad_(True)
    g = torch.arange(96) // 32
    codes = (layer.codes() - layer.zeros().t()[:, g]).float()  # [out, in]
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = x_ref @ (codes * s.t()[:, g]).t() + layer.bias
    (y_ref * r).sum().backward()
    torch.testing.assert_close(layer.scale_multiplier.grad, s.grad * s0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_folding_keeps_the_outputs_bit_for_bit_and_the_state_dict_clean(tmp_path):
    layer = _layer(bits=3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    add_multipliers(layer)
    assert set(layer.state_dict()) == set(before)  # the multiplier never enters the state dict
    with torch.no_grad():
        layer.scale_multiplier.mul_(1 + 0.3 * torch.rand_like(layer.scale_multiplier))
    x = torch.randn(7, 96)
    with torch.no_grad():
        trained = layer(x)
        weight = layer.dequantize_weight()
    assert fold_multipliers(layer) == 1 and layer.scale_multiplier is None
    with torch.no_grad():
        assert torch.equal(layer(x), trained)
        assert torch.equal(layer.dequantize_weight(), weight)
    assert not torch.equal(layer.state_dict()["scales"], before["scales"])
    assert torch.equal(layer.state_dict()["qweight"], before["qweight"])
    assert torch.equal(layer.state_dict()["qzeros"], before["qzeros"])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("scales")
    tokenizer = make_tokenizer()
    calib = tokenize_calibration(tokenizer, [TEXT * 20], num_samples=4, seq_len=32)
    model = quantize_model(make_tiny_llama(seed=0), calib, QuantConfig(bits=2, group_size=32))
    save_quantized(model, root / "base", tokenizer)
    return root / "base"


def _train(base_dir, math_file, out, adapter="diablo", **extra):
    from qdiablo.train import TrainConfig, train

    config = TrainConfig(
        model=str(base_dir),
        base="gptq",
        adapter=adapter,
        num_blocks=8,
        rank=4,
        data=[str(math_file)],
        max_length=256,
        batch_size=4,
        max_steps=3,
        lr=2e-2,
        scale_lr=5e-2,
        warmup=0,
        save_steps=0,
        logging_steps=1,
        progress=False,
        output=str(out),
        train_scales=True,
        **extra,
    )
    return train(config)


def _gptq_weight(tensors: dict, name: str, bits: int = 2) -> torch.Tensor:
    """A GPTQ v2 layer's weight [in, out] from its saved tensors, unpacked here from the layout
    (16 2-bit codes per int32, lowest bits first), independently of quantizers.packing."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    mask = 2**bits - 1
    qweight, qzeros = tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"]
    codes = ((qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask).reshape(-1, qweight.shape[1])
    zeros = ((qzeros.unsqueeze(2) >> shifts.view(1, 1, -1)) & mask).reshape(qzeros.shape[0], -1)
    g = tensors[f"{name}.g_idx"].long()
    return (codes - zeros[g]).float() * tensors[f"{name}.scales"].float()[g]


def test_trained_scales_round_trip_save_export_gptq_layout_and_merge(base_dir, math_file, tmp_path):
    run = _train(base_dir, math_file, tmp_path / "run")
    assert run.results["trained_scales"] > 0
    trained = multipliers(run.model.model)
    assert trained and any(not torch.all(m == 1) for m in trained.values())  # they moved
    run.model.eval()
    reference = run.model(input_ids=IDS).logits.detach()
    adapter = run.adapter_dir
    saved = load_file(adapter / SCALES_FILE)
    assert set(saved) == set(trained)
    for name, m in trained.items():
        assert torch.equal(saved[name], m)
    # Reloaded for evaluation: the scales are folded into the base, the outputs bit for bit.
    reloaded = load_adapter(load_packed(base_dir), adapter)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, reference)
    # Export: base/ carries the trained scales in its GPTQ tensors; adapter/ has no scales file.
    out = export_model(base_dir, adapter, tmp_path / "export", merged=True, merged_dtype="float32")
    assert not (out / "adapter" / SCALES_FILE).exists()
    exported = load_exported(out)
    with torch.no_grad():
        assert torch.equal(exported(input_ids=IDS).logits, reference)
    tensors, original = load_file(out / "base" / "model.safetensors"), load_quantized(base_dir)
    for name, m in trained.items():
        layer = original.get_submodule(name)
        s = (layer.packed_tensors().scales.float() * m).clamp(min=MIN_SCALE).half()
        assert torch.equal(tensors[f"{name}.scales"], s)
        expected = layer.codes().t() - layer.zeros()[layer.packed_tensors().g_idx.long()]
        expected = expected.float() * s.float()[layer.packed_tensors().g_idx.long()]
        assert torch.equal(_gptq_weight(tensors, name), expected)
    plain = load_quantized(out / "base")  # the GPTQ-layout reader: no adapter, no extra file
    for name in trained:
        w = plain.get_submodule(name).dequantize_weight().t()
        assert torch.equal(w, _gptq_weight(tensors, name))
    # Merge: W + Dᵀ on the base with the trained scales.
    merged = merge_into_dense(load_adapter(load_packed(base_dir), adapter), torch.float32)
    for name, layer in reloaded.diablo_layers():
        expected = layer.base_layer.dequantize_weight() + layer.delta_weight()
        assert torch.equal(merged.get_submodule(name).weight, expected)
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=IDS).logits, reference, rtol=1e-4, atol=1e-4)


def test_trained_scales_with_lora_and_refusals(base_dir, math_file, tmp_path, monkeypatch):
    run = _train(base_dir, math_file, tmp_path / "lora", adapter="lora")
    run.model.eval()
    with torch.no_grad():
        reference = run.model(input_ids=IDS).logits
    assert (run.adapter_dir / SCALES_FILE).is_file()
    reloaded = load_adapter(load_packed(base_dir), run.adapter_dir)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, reference)
    # Onto another base: refused, naming the file.
    other = tmp_path / "other"
    save_quantized(
        quantize_model(
            make_tiny_llama(seed=1),
            tokenize_calibration(make_tokenizer(), [TEXT * 20], 4, 32),
            QuantConfig(bits=2, group_size=32),
        ),
        other,
        make_tokenizer(),
    )
    with pytest.raises(UserError, match="another base's scales"):
        load_adapter(load_packed(other), run.adapter_dir)
    # A float base has no scales to train; FSDP is refused with a clear line.
    from qdiablo.train import TrainConfig, train

    with pytest.raises(UserError, match="--train-scales needs a packed base"):
        train(TrainConfig(model="x", base="fp", train_scales=True, output=str(tmp_path / "fp")))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(UserError, match="not supported under FSDP"):
        _train(base_dir, math_file, tmp_path / "fsdp")
    meta = json.loads((run.output / "train_results.json").read_text())
    assert meta["trained_scales"] == run.results["trained_scales"]


def test_resume_with_trained_scales_is_bit_identical(base_dir, math_file, tmp_path):
    """Checkpoints hold the multipliers (and the optimizer their own group): a run stopped and
    resumed ends with the same adapter and the same scales as an uninterrupted one."""
    from transformers import TrainerCallback

    from qdiablo.train import TrainConfig, train

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= 2:
                control.should_training_stop = True

    def config(name, **extra):
        return TrainConfig(
            model=str(base_dir), base="gptq", num_blocks=8, data=[str(math_file)],
            max_length=256, batch_size=4, micro_batch_size=2, max_steps=4, save_steps=2,
            lr=1e-2, scale_lr=1e-2, warmup=1, progress=False, train_scales=True,
            output=str(tmp_path / name), **extra,
        )  # fmt: skip

    full = train(config("full"))
    train(config("cut"), callbacks=[StopAt()])
    checkpoint = tmp_path / "cut" / "checkpoints" / "checkpoint-2"
    assert (checkpoint / SCALES_FILE).is_file()
    resumed = train(config("cut", resume="auto"))
    assert resumed.results["resumed_from"].endswith("checkpoint-2")
    for name in ("adapter_model.safetensors", SCALES_FILE):
        a, b = load_file(full.adapter_dir / name), load_file(resumed.adapter_dir / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
