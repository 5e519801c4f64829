"""Block-wise reconstruction (quantizers/reconstruct.py) on tiny random LLaMA models."""

import copy
import json

import pytest
import torch
from conftest import make_tiny_llama, make_tokenizer
from safetensors.torch import load_file, save_file

from qdiablo import cli
from quantizers import QuantConfig, QuantLinear, load_quantized, quantize_model, save_quantized
from quantizers.calibration import block_output
from quantizers.recon_data import split_holdout
from quantizers.reconstruct import _batch_order
from quantizers.rtn import rtn_quantize
from quantizers.trainable import TrainableQuantLinear

TEXT = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether in April and May? "
)


def calibration(samples=16, seq_len=64):
    texts = [TEXT * 4, "Weng earns $12 an hour for babysitting. " * 9] * 6
    from quantizers import tokenize_calibration

    return tokenize_calibration(make_tokenizer(), texts, samples, seq_len, batch_size=4)


def last_block_outputs(model, windows):
    outputs = []
    block = model.model.layers[-1]
    handle = block.register_forward_hook(lambda _m, _a, out: outputs.append(block_output(out)))
    with torch.no_grad():
        for w in windows:
            model(w)
    handle.remove()
    return torch.cat(outputs)


def heldout_output_error(model, fp_model, windows):
    """Relative squared error of the last decoder block's outputs against the fp model's."""
    out, ref = last_block_outputs(model, windows), last_block_outputs(fp_model, windows)
    return float(((out - ref) ** 2).sum() / (ref**2).sum())


def test_split_holdout_keeps_every_window_in_order():
    calib = calibration(samples=10)
    train, held = split_holdout(calib, 0.25)
    assert [b.shape[0] for b in train] == [4, 4]
    assert [b.shape[0] for b in held] == [2]
    assert torch.equal(torch.cat(train + held), torch.cat(calib))
    with pytest.raises(ValueError, match="at least 2 calibration windows"):
        split_holdout([calib[0][:1]], 0.25)
    assert split_holdout(calib, 0.0)[1] == []


def test_reconstruction_lowers_heldout_error_and_round_trips(tmp_path):
    fp = make_tiny_llama(init_range=0.2)
    calib = calibration()
    fitted = split_holdout(calib, 0.25)[0]  # the windows GPTQ and reconstruction fit
    off = quantize_model(copy.deepcopy(fp), fitted, QuantConfig(bits=2, group_size=32, magr=True))
    config = QuantConfig(bits=2, group_size=32, magr=True, reconstruct=True, recon_steps=80)
    on = quantize_model(copy.deepcopy(fp), calib, config)
    report = on.quantization_report
    assert report.heldout_windows == 4 and len(report.reconstruction) == 2
    for block in report.reconstruction:
        assert block.kept and block.heldout_after < block.heldout_before
    # GPTQ did not see the held-out windows: the first block's layers match a run on the others.
    for a, b in zip(off.quantization_report.layers[:7], report.layers[:7]):
        assert a.rel_error == pytest.approx(b.rel_error, rel=1e-4)
    # Independent of the report: the whole model's last block outputs on the held-out windows
    # move closer to the full-precision model's.
    held = [w[None] for w in torch.cat(calib)[-4:]]
    error_on, error_off = heldout_output_error(on, fp, held), heldout_output_error(off, fp, held)
    assert error_on < 0.9 * error_off
    # The packed layout: saved and reloaded bit for bit, and the report records the run.
    save_quantized(on, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(held[0]).logits, on(held[0]).logits)
    meta = json.loads((tmp_path / "q" / "quantize_config.json").read_text())["meta"]["qdiablo"]
    assert meta["reconstruct"] is True and meta["recon_steps"] == 80
    saved = json.loads((tmp_path / "q" / "quantization_report.json").read_text())
    assert saved["reconstruction"][0]["heldout_after"] == report.reconstruction[0].heldout_after
    assert "Block-wise reconstruction" in (tmp_path / "q" / "quantization_report.md").read_text()


@pytest.mark.parametrize("checkpoint_format", ["gptq_v2", "gptq"])
def test_packed_layer_equals_the_trained_parameterisation(tmp_path, checkpoint_format):
    torch.manual_seed(0)
    bits, group = 2, 32
    min_zero = 1 if checkpoint_format == "gptq" else 0
    W = torch.randn(64, 96)
    bias = torch.randn(64)
    layer = QuantLinear.from_result(rtn_quantize(W, bits, group, min_zero=min_zero), group, bias)
    trainable = TrainableQuantLinear(layer)
    with torch.no_grad():  # what training could do: latents far out of range, odd scales
        trainable.latent.add_(3 * torch.randn_like(trainable.latent))
        trainable.multiplier.mul_(1 + 0.3 * torch.rand_like(trainable.multiplier))
    trainable.clamp_latent_()
    packed = trainable.to_quant_linear()
    save_file(packed.state_dict(), tmp_path / "layer.safetensors")
    reloaded = QuantLinear(96, 64, bits, group, bias=True)
    reloaded.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    # Independent reference: the parameterisation with fp16-rounded scales, written out.
    codes = torch.clamp(trainable.latent.detach().round(), 0, 2**bits - 1)
    scales = (trainable.scales0 * trainable.multiplier.detach()).half().float()
    g = torch.arange(96) // group
    reference = (codes - trainable.zeros.t()[:, g]) * scales.t()[:, g]
    assert torch.equal(reloaded.dequantize_weight(), reference)
    assert torch.equal(trainable.weight(fp16_scales=True).detach(), reference)
    x = torch.randn(5, 96)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), x @ reference.t() + bias, rtol=1e-5, atol=1e-5)
    assert reloaded.packed_tensors().scales.dtype == torch.float16
    assert int(reloaded.codes().min()) >= 0 and int(reloaded.codes().max()) <= 3
    assert int(reloaded.zeros().min()) >= min_zero and int(reloaded.zeros().max()) <= 3
    assert bool((codes != layer.codes()).any())  # the test did move codes


def test_heldout_data_apart_and_the_schedule(tmp_path):
    """Held-out windows given apart are neither fitted by GPTQ nor trained on; an epoch is one
    pass over the training mini-batches; trained norms change only where they helped."""
    fp = make_tiny_llama(init_range=0.2)
    calib, held = calibration(samples=12), calibration(samples=16)[3:]
    config = QuantConfig(
        bits=2, group_size=32, magr=True, reconstruct=True, recon_batch_size=3,
        recon_epochs=2, recon_eval_every=100, recon_norms=True,
    )  # fmt: skip
    on = quantize_model(copy.deepcopy(fp), calib, config, heldout_data=held)
    report = on.quantization_report
    assert report.heldout_windows == 4 and report.calibration_tokens == 16 * 64
    assert [r.steps for r in report.reconstruction] == [8, 8]  # 2 epochs x 4 batches of 3
    in_threes = split_holdout(calib, 0.0, batch_size=3)[0]  # as reconstruction batches them
    off = quantize_model(
        copy.deepcopy(fp), in_threes, QuantConfig(bits=2, group_size=32, magr=True)
    )
    for a, b in zip(off.quantization_report.layers[:7], report.layers[:7]):
        assert a.rel_error == pytest.approx(b.rel_error, rel=1e-4)
    for i, r in enumerate(report.reconstruction):
        norm = on.model.layers[i].input_layernorm.weight
        moved = not torch.equal(norm, fp.model.layers[i].input_layernorm.weight)
        assert moved == r.kept  # a block that kept its GPTQ result also kept its norms


def test_batch_order_covers_whole_epochs():
    order = _batch_order(5, 12, seed=3)
    assert sorted(order[:5]) == list(range(5)) and sorted(order[5:10]) == list(range(5))
    assert order == _batch_order(5, 12, seed=3) and order != _batch_order(5, 12, seed=4)


def test_reconstruct_config_validation():
    for kw, field in [
        ({"recon_steps": 0}, "recon_steps"),
        ({"recon_epochs": 0}, "recon_epochs"),
        ({"recon_batch_size": 0}, "recon_batch_size"),
        ({"recon_schedule": "step"}, "recon_schedule"),
        ({"recon_lr_norm": 0}, "recon_lr_norm"),
        ({"recon_norms": 1}, "recon_norms"),
        ({"recon_lr_code": 0}, "recon_lr_code"),
        ({"recon_lr_scale": -1.0}, "recon_lr_scale"),
        ({"recon_params": "zeros"}, "recon_params"),
        ({"recon_holdout": 1.0}, "recon_holdout"),
        ({"recon_eval_every": 0}, "recon_eval_every"),
        ({"recon_patience": 0}, "recon_patience"),
        ({"reconstruct": "yes"}, "reconstruct"),
    ]:
        with pytest.raises(ValueError, match=f"QuantConfig.{field}"):
            QuantConfig(**kw)
    config = QuantConfig(reconstruct=True, recon_steps=7, recon_params="scales")
    assert QuantConfig.from_dict(config.to_dict()) == config


def test_quantize_cli_reconstruct_flags(tiny_model_dir, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join([TEXT] * 30))
    out = tmp_path / "w2"
    common = ["quantize", "--model", str(tiny_model_dir), "--bits", "2", "--group-size", "32"]
    common += ["--calib", str(calib), "--calib-samples", "8", "--calib-seq-len", "32"]
    argv = [*common, "--output", str(out), "--reconstruct", "--recon-steps", "5"]
    argv += ["--recon-params", "scales", "--recon-lr-scale", "0.002", "--recon-holdout", "0.5"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "+ reconstruction" in printed and "held-out windows" in printed
    meta = json.loads((out / "quantize_config.json").read_text())["meta"]["qdiablo"]
    assert meta["reconstruct"] is True
    assert (meta["recon_steps"], meta["recon_params"]) == (5, "scales")
    assert (meta["recon_lr_scale"], meta["recon_holdout"]) == (0.002, 0.5)
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["heldout_windows"] == 4 and len(report["reconstruction"]) == 2
    bad = [*common, "--output", str(tmp_path / "bad"), "--reconstruct", "--recon-holdout", "1"]
    assert cli.main(bad) != 0
    assert "--recon-holdout" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_compare_grid_adds_the_recon_method_by_name(tmp_path, tiny_model_dir, math_file):
    from test_compare import grid_config

    from qdiablo.pipeline.compare import build_grid

    added = [{"name": "MagR-DiaBlo+recon"}, {"name": "GPTQ-LoRA+recon"}]
    data = grid_config(tmp_path, tiny_model_dir, math_file, methods=added)
    grid = build_grid(data, "c.yaml")
    cells = {c.method.name: c for c in grid.cells}
    assert "MagR-DiaBlo+recon" in cells and "MagR-DiaBlo" in cells
    lora = cells["GPTQ-LoRA+recon"]  # LoRA on the very same reconstructed base
    assert lora.base is cells["MagR-DiaBlo+recon"].base and lora.train.args["adapter"] == "lora"
    recon, plain = cells["MagR-DiaBlo+recon"], cells["MagR-DiaBlo"]
    assert recon.base.namespace().reconstruct is True
    assert plain.base.namespace().reconstruct is False
    assert recon.base.key != plain.base.key and "recon" in recon.base.key
    assert recon.train.args["adapter"] == "diablo"
    default = build_grid(grid_config(tmp_path, tiny_model_dir, math_file), "c.yaml")
    assert not {"MagR-DiaBlo+recon", "GPTQ-LoRA+recon"} & {c.method.name for c in default.cells}


def test_export_requantize_reruns_reconstruction_when_the_base_had_it():
    from qdiablo.export import requantize_config

    entry = QuantConfig(bits=2, magr=True, reconstruct=True, recon_steps=7).quantization_config()
    config = requantize_config(entry, None)
    assert config.reconstruct is True and config.recon_steps == 7 and config.magr is True
    assert requantize_config(entry, {"reconstruct": False}).reconstruct is False
    foreign = {k: v for k, v in entry.items() if k != "meta"}  # a GPTQ folder from another tool
    assert requantize_config(foreign, None).reconstruct is False
    assert requantize_config(foreign, {"reconstruct": True}).reconstruct is True


@pytest.mark.parametrize("patience", [1, 4])
def test_training_stops_after_patience_checks_without_a_new_best(caplog, patience):
    """The stop step follows from the logged held-out errors alone: the first step at which
    `patience` evaluations in a row have not beaten the best error so far."""
    import logging
    import re

    fp = make_tiny_llama(init_range=0.2)
    config = QuantConfig(
        bits=2,
        group_size=32,
        magr=True,
        reconstruct=True,
        recon_steps=40,
        recon_eval_every=1,
        recon_patience=patience,
        recon_lr_scale=0.05,
        recon_lr_code=0.3,
    )  # fmt: skip  (high learning rates: a noisy held-out error)
    with caplog.at_level(logging.DEBUG, logger="quantizers.reconstruct"):
        model = quantize_model(copy.deepcopy(fp), calibration(), config)
    stops = []
    for block in model.quantization_report.reconstruction:
        pattern = re.compile(re.escape(block.name) + r": step (\d+), held-out error ([\d.e+-]+)")
        series = [float(m.group(2)) for r in caplog.records if (m := pattern.match(r.getMessage()))]
        best, stale, expected = block.heldout_before, 0, len(series)
        for step, err in enumerate(series, 1):
            best, stale = (err, 0) if err < best else (best, stale + 1)
            if stale >= patience:
                expected = step
                break
        assert block.steps == expected == len(series)
        stops.append(expected)
    assert min(stops) < 40  # the rule did stop something early


def test_topk_kl_is_the_full_kl_with_every_token_and_a_lower_bound_with_fewer():
    from quantizers.e2e import TopK, topk_kl

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 40), 2 * torch.randn(2, 6, 40)
    p = torch.softmax(teacher.double(), -1)
    full = (p * (p.log() - torch.log_softmax(student.double(), -1))).sum(-1).mean()

    def targets(k):
        logp = torch.log_softmax(teacher, -1)
        top, ids = logp.topk(k, -1)
        rest = torch.log((1 - top.exp().sum(-1)).clamp(min=1e-30))
        return TopK(ids.int(), top, rest)

    torch.testing.assert_close(topk_kl(student, targets(40)).double(), full, rtol=1e-4, atol=1e-5)
    assert topk_kl(student, targets(8)) <= full + 1e-5
    assert topk_kl(teacher, targets(8)) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("loss", ["kl", "lm"])
def test_end_to_end_stage_lowers_its_heldout_loss_and_keeps_the_layout(tmp_path, loss):
    fp = make_tiny_llama(init_range=0.2)
    calib = calibration()
    config = QuantConfig(
        bits=2, group_size=32, magr=True, reconstruct=True, recon_steps=4,
        recon_e2e_epochs=4, recon_e2e_lr=1e-2, recon_e2e_loss=loss,
    )  # fmt: skip
    model = quantize_model(copy.deepcopy(fp), calib[:3], config, heldout_data=calib[3:])
    e2e = model.quantization_report.e2e
    assert e2e.kept and e2e.heldout_after < e2e.heldout_before and e2e.steps > 0
    assert not any(m.scale_multiplier is not None for m in model.modules() if hasattr(m, "bits"))
    save_quantized(model, tmp_path / "q")
    ids = calib[3][:1]
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "q")(ids).logits, model(ids).logits)
    assert "End-to-end scales" in (tmp_path / "q" / "quantization_report.md").read_text()


def test_end_to_end_stage_recomputing_activations_gives_the_same_scales():
    """On a GPU the stage recomputes each block's activations in the backward pass (its memory);
    the gradients, hence the trained scales, are those of the stage that keeps them."""
    from quantizers.e2e import train_scales_end_to_end
    from quantizers.trained_scales import packed_layers

    calib = calibration()
    config = QuantConfig(bits=2, group_size=32, magr=True)
    base = quantize_model(make_tiny_llama(init_range=0.2), calib, config)
    results, calls = [], []
    for checkpointing in (False, True):
        model = copy.deepcopy(base)
        act, count = model.model.layers[0].mlp.act_fn, [0]
        forward = act.forward  # counted by the call itself: module hooks do not see a recompute

        def counted(*args, forward=forward, count=count):
            count[0] += 1
            return forward(*args)

        act.forward = counted
        report = train_scales_end_to_end(
            model, calib, None, heldout=1, epochs=3, lr=1e-2, checkpointing=checkpointing
        )
        calls.append(count[0])
        assert report.steps > 0 and not model.training  # the mode is restored
        assert not model.is_activation_checkpointing
        scales = {n: m.packed_tensors().scales.clone() for n, m in packed_layers(model).items()}
        results.append((report.heldout_after, scales))
    assert calls[1] == calls[0] + report.steps  # each step ran the MLP once more: recomputed
    (loss_kept, kept), (loss_recomputed, recomputed) = results
    assert kept.keys() == recomputed.keys() and kept
    before = {n: m.packed_tensors().scales for n, m in packed_layers(base).items()}
    assert any(not torch.equal(kept[n], before[n]) for n in kept)  # it trained
    for n in kept:
        torch.testing.assert_close(recomputed[n], kept[n], rtol=0, atol=1e-3)
    assert loss_recomputed == pytest.approx(loss_kept, rel=1e-4)


def test_teacher_block_by_block_is_the_models_own_top_k():
    """The end-to-end stage's teacher runs every batch through block i before block i + 1
    (each block read once) and the model's own norm and head after: its top-k must be that of
    the model's plain forward pass."""
    from quantizers.e2e import teacher_topk

    model = make_tiny_llama(init_range=0.2).eval()
    calib = calibration()
    teacher = teacher_topk(model, calib, k=8, autocast_dtype=None)
    assert len(teacher) == len(calib)
    for batch, t in zip(calib, teacher):
        with torch.no_grad():
            logp = torch.log_softmax(model(batch, use_cache=False).logits.float(), dim=-1)
        top, ids = logp.topk(8, dim=-1)
        torch.testing.assert_close(t.logprobs, top, rtol=0, atol=1e-5)
        assert torch.equal(t.ids, ids.int())
    assert all(not p.is_meta for p in model.parameters())  # a whole model keeps its blocks
