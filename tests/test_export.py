"""`qdiablo export`: the folder layout, exact reloading, the merged model under plain transformers,
the manifest's integrity checks, re-quantization, the model card, atomic writes and the CLI.

One tiny pipeline (MagR+GPTQ base -> a few DiaBlo training steps -> a short eval) is built once
per module; each test exports from it."""

from __future__ import annotations

import filecmp
import json
import logging
import shutil

import pytest
import torch
from conftest import make_tiny_llama, make_tokenizer
from huggingface_hub import ModelCard

from qdiablo import cli
from qdiablo.adapters.loading import load_adapter
from qdiablo.errors import UserError
from qdiablo.export import export_model, load_exported, verify_export
from qdiablo.outputs import is_bookkeeping
from quantizers import QuantConfig, QuantLinear, load_quantized, quantize_model, save_quantized
from quantizers.calibration import tokenize_calibration

TEXT = "Natalia sold clips to 48 of her friends in April, and half as many clips in May.\n\n"
IDS = torch.tensor([[1, 72, 101, 108, 108, 111, 44, 32, 50, 43, 51, 61], [1, *range(60, 71)]])


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, math_file):
    """A quantized base (MagR + GPTQ W4 g32), a trained DiaBlo adapter and an eval folder."""
    from qdiablo.train import TrainConfig, train

    root = tmp_path_factory.mktemp("pipeline")
    tokenizer = make_tokenizer()
    calib = tokenize_calibration(tokenizer, [TEXT * 20], num_samples=4, seq_len=32)
    model = make_tiny_llama(seed=0)
    config = QuantConfig(bits=4, group_size=32, magr=True, magr_iters=5)
    save_quantized(quantize_model(model, calib, config), root / "base", tokenizer)
    run = train(
        TrainConfig(
            model=str(root / "base"),
            base="gptq",
            num_blocks=8,
            data=[str(math_file)],
            max_length=256,
            batch_size=4,
            max_steps=3,
            lr=2e-2,
            warmup=0,
            save_steps=0,
            logging_steps=1,
            progress=False,
            output=str(root / "train"),
        )
    )
    eval_argv = ["eval", "--model", str(root / "base"), "--adapter", str(root / "train/adapter")]
    eval_argv += ["--limit", "1", "--max-new-tokens", "4", "--threads", "1", "--no-progress"]
    assert cli.main([*eval_argv, "--output", str(root / "eval")]) == 0
    (root / "calib.txt").write_text(TEXT * 30)
    return {
        "root": root,
        "base": root / "base",
        "train": root / "train",
        "adapter": root / "train/adapter",
        "eval": root / "eval",
        "calib": root / "calib.txt",
        "trained": run.model.eval(),
    }


@pytest.fixture(scope="module")
def exported(pipeline):
    """base/ + adapter/ + merged/ (float32), with the training and eval records."""
    out = pipeline["root"] / "export-fp32"
    export_model(
        pipeline["base"],
        None,
        out,
        train_run=pipeline["train"],
        evals=[pipeline["eval"]],
        merged=True,
        merged_dtype="float32",
    )
    return out


def test_export_reloads_bit_identical_to_the_in_memory_model(pipeline, exported):
    ref = load_adapter(load_quantized(pipeline["base"]), pipeline["adapter"])
    loaded = load_exported(exported)
    assert torch.equal(_logits(loaded), _logits(ref))
    assert torch.equal(_logits(loaded), _logits(pipeline["trained"]))  # the model training left
    assert not torch.equal(_logits(loaded), _logits(load_quantized(pipeline["base"])))  # trained
    # base/ and adapter/ are the input files, byte for byte; the manifest lists every file.
    for part, src in (("base", pipeline["base"]), ("adapter", pipeline["adapter"])):
        names = sorted(p.name for p in src.iterdir() if not is_bookkeeping(p.name))
        assert sorted(p.name for p in (exported / part).iterdir()) == names
        assert filecmp.cmpfiles(src, exported / part, names, shallow=False)[0] == names
    manifest = json.loads((exported / "manifest.json").read_text())
    files = {
        p.relative_to(exported).as_posix()
        for p in exported.rglob("*")
        if p.is_file() and not is_bookkeeping(p.name)
    }
    assert set(manifest["files"]) == files - {"manifest.json"}
    assert "base/tokenizer.json" in files and manifest["qdiablo_version"]


def test_merged_folder_is_plain_transformers_with_the_adapted_logits(pipeline, exported):
    from transformers import AutoModelForCausalLM

    adapted = load_exported(exported)
    cfg = json.loads((exported / "merged/config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    merged = AutoModelForCausalLM.from_pretrained(exported / "merged")
    assert not any(isinstance(m, QuantLinear) for m in merged.modules())
    # docs/diablo.md §5: W + Dᵀ with W the dequantized base weight (exactly, in float32).
    layer = adapted.get_base_model().model.layers[1].mlp.down_proj
    D = torch.block_diag(*layer.blocks.detach())  # (in, out): block i maps slice i to slice i
    want = layer.base_layer.dequantize_weight() + D.t()
    assert torch.equal(merged.model.layers[1].mlp.down_proj.weight, want)
    # fp32 both ways: x(W+Dᵀ)ᵀ vs xWᵀ + xD differ only by summation order (~1e-7 relative).
    ref = _logits(adapted)
    torch.testing.assert_close(_logits(merged), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_float16_merged_within_fp16_rounding(pipeline, tmp_path):
    from transformers import AutoModelForCausalLM

    out = export_model(pipeline["base"], pipeline["adapter"], tmp_path / "e", merged=True)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    assert AutoModelForCausalLM.from_pretrained(out / "merged").dtype == torch.float16
    ref = _logits(load_exported(out))
    # Each weight is rounded to fp16 (relative error <= 2^-11 ≈ 4.9e-4); through two blocks and
    # the head the logits move by well under 1% of their scale; a wrong merge moves them by more.
    err = (_logits(merged) - ref).abs().max().item()
    assert err <= 5e-3 * ref.abs().max().item()
    base_only = _logits(load_quantized(pipeline["base"]))
    assert err < 0.1 * (base_only - ref).abs().max().item()


def test_any_corrupted_missing_or_unlisted_file_is_named(exported, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert verify_export(copy)["files"] == manifest["files"]
    for rel in manifest["files"]:
        file = copy / rel
        data = file.read_bytes()
        file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped bit, same size
        with pytest.raises(UserError, match=rel.split("/")[-1]) as e:
            load_exported(copy)
        assert str(file) in str(e.value) and "sha256" in str(e.value)
        file.write_bytes(data)
    (copy / "adapter/adapter_model.safetensors").rename(tmp_path / "moved")
    with pytest.raises(UserError, match=r"adapter_model\.safetensors: missing"):
        verify_export(copy)
    (tmp_path / "moved").rename(copy / "adapter/adapter_model.safetensors")
    (copy / "stray.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match=r"stray\.safetensors: not listed"):
        verify_export(copy)
    (copy / "stray.safetensors").unlink()
    edited = json.loads((copy / "manifest.json").read_text())
    edited["files"]["base/config.json"]["size"] += 1
    (copy / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(UserError, match=r"base/config\.json: \d+ bytes, but manifest"):
        load_exported(copy, verify=False)  # sizes are checked even without hashes
    del edited["files"]["base/config.json"]
    (copy / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(UserError, match=r"base/config\.json: not listed"):
        verify_export(copy)


def test_adapter_from_another_base_is_refused_before_writing(pipeline, tmp_path):
    other = tmp_path / "other-base"
    model = make_tiny_llama(seed=0)  # same weights, 2 bits: only the fingerprint tells
    config = QuantConfig(method="rtn", bits=2, group_size=32)
    save_quantized(quantize_model(model, None, config), other)
    with pytest.raises(UserError, match="trained on a different base"):
        export_model(other, pipeline["adapter"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["other-base"]  # no temporary left


def test_requantize_needs_calib_then_writes_a_loadable_gptq_folder(pipeline, tmp_path, caplog):
    with pytest.raises(UserError, match="--requantize needs calibration data"):
        export_model(pipeline["base"], pipeline["adapter"], tmp_path / "a", requantize_merged=True)
    assert not (tmp_path / "a").exists()
    with caplog.at_level(logging.WARNING):
        out = export_model(
            pipeline["base"],
            pipeline["adapter"],
            tmp_path / "b",
            requantize_merged=True,
            calib=pipeline["calib"],
            calib_samples=4,
            calib_seq_len=32,
            quant_overrides={"bits": 8},
        )
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("this changes its outputs" in m for m in warned)
    assert any("re-quantization changed the logits by max" in m for m in warned)
    assert (out / "merged").is_dir()  # --requantize implies --merged
    requant = load_quantized(out / "merged-gptq")
    assert {m.bits for m in requant.modules() if isinstance(m, QuantLinear)} == {8}
    qc = json.loads((out / "merged-gptq/quantize_config.json").read_text())
    assert qc["meta"]["qdiablo"]["magr"] is True  # the base's settings, bits overridden
    merged = load_exported(out, merged=True, dtype=torch.float32)
    diff = (_logits(requant) - _logits(merged)).abs().max().item()
    assert 0 < diff < 0.1 * _logits(merged).abs().max().item()  # changed, but 8-bit close
    card = (out / "README.md").read_text()
    assert "Re-quantizing changes the outputs" in card and "logits moved by max" in card


def test_model_card_records_quantizer_training_and_scores(pipeline, exported):
    card = (exported / "README.md").read_text()
    summary = json.loads((pipeline["eval"] / "summary.json").read_text())
    for text in (
        "bits: 4; group size: 32",
        "act-order (desc_act): False; sym: False",
        "MagR: on (α = 0.0001, 5 fista iterations)",
        "calibration: 128 tokens",
        "N = 8 diagonal blocks",
        "q_proj, k_proj, v_proj, up_proj, down_proj",
        "decontamination against gsm8k, SVAMP, mawps, AQuA",
        "optimizer steps: 3",
        "learning rate: 0.02",
        "mean (4 tasks)",
        f"{summary['mean']['nll']:.4f}",
        f"| SVAMP | 1 | {summary['tasks']['SVAMP']['accuracy']:.1f} |",
        "transformers 5",
        'AutoModelForCausalLM.from_pretrained("EXPORT_DIR/merged")',
        'GPTQModel.load("EXPORT_DIR/base")',
    ):
        assert text in card, text
    assert "## Notes" not in card  # the train run and eval are of this very adapter
    # the YAML header the Hub reads: no base_model (no Hub id recorded), no library_name: peft
    meta = ModelCard.load(exported / "README.md").data.to_dict()
    assert "base_model" not in meta and "library_name" not in meta
    assert {"qdiablo", "diablo", "gptq", "4-bit", "magr"} <= set(meta["tags"])
    assert meta["quantization"] == {
        "quant_method": "gptq",
        "method": "gptq",
        "bits": 4,
        "group_size": 32,
        "sym": False,
        "desc_act": False,
        "checkpoint_format": "gptq_v2",
        "magr": True,
    }


def test_overwrite_and_a_failure_midway_leave_no_partial_export(pipeline, tmp_path, monkeypatch):
    out = tmp_path / "out"
    export_model(pipeline["base"], pipeline["adapter"], out)
    before = (out / "manifest.json").read_text()
    with pytest.raises(UserError, match="already holds a finished `qdiablo export`") as e:
        export_model(pipeline["base"], pipeline["adapter"], out)
    assert "--overwrite" in e.value.hint

    def boom(_facts):
        raise RuntimeError("disk full")

    monkeypatch.setattr("qdiablo.export.export.model_card", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(pipeline["base"], pipeline["adapter"], tmp_path / "new", merged=True)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(pipeline["base"], pipeline["adapter"], out, merged=True, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no new folder, no temporaries
    assert (out / "manifest.json").read_text() == before and verify_export(out)
    monkeypatch.undo()
    export_model(pipeline["base"], pipeline["adapter"], out, merged=True, overwrite=True)
    assert (out / "merged").is_dir() and verify_export(out)


def test_cli_end_to_end(pipeline, tmp_path, capsys):
    out = tmp_path / "export"
    argv = ["export", "--base", str(pipeline["base"]), "--train-run", str(pipeline["train"])]
    argv += ["--eval", str(pipeline["eval"]), "--output", str(out), "--requantize"]
    assert cli.main(argv) == 2
    assert "--requantize needs calibration data" in capsys.readouterr().err
    argv += ["--calib", str(pipeline["calib"]), "--calib-samples", "4", "--calib-seq-len", "32"]
    argv += ["--base-model-name", "org/tiny-llama"]
    assert cli.main([*argv, "--merged-dtype", "bfloat16", "--method", "rtn", "--no-magr"]) == 0
    assert "- name: org/tiny-llama" in (out / "README.md").read_text()
    assert ModelCard.load(out / "README.md").data.base_model == "org/tiny-llama"
    assert "exported adapter, base, merged, merged-gptq" in capsys.readouterr().out
    assert json.loads((out / "merged/config.json").read_text())["dtype"] == "bfloat16"
    qc = json.loads((out / "merged-gptq/quantize_config.json").read_text())
    assert (qc["meta"]["qdiablo"]["method"], qc["meta"]["qdiablo"]["magr"]) == ("rtn", False)
    assert cli.main(["export", "--verify", str(out)]) == 0
    assert "match manifest.json" in capsys.readouterr().out
    assert cli.main(argv) == 2 and "pass --overwrite" in capsys.readouterr().err
    (out / "base/model.safetensors").write_bytes(b"truncated")
    assert cli.main(["export", "--verify", str(out)]) == 2
    assert "base/model.safetensors" in capsys.readouterr().err


def test_eval_accepts_an_export_folder(exported, tmp_path, capsys):
    argv = ["eval", "--model", str(exported), "--nll-only", "--tasks", "SVAMP", "--limit", "2"]
    assert cli.main([*argv, "--threads", "1", "--no-progress", "--output", str(tmp_path)]) == 0
    nll = json.loads((tmp_path / "summary.json").read_text())["tasks"]["SVAMP"]["nll"]
    assert nll is not None and nll > 0


def test_a_peft_lora_adapter_exports_unmerged_and_the_card_says_so(pipeline, tmp_path):
    pytest.importorskip("peft")
    from qdiablo.adapters.lora import attach_lora

    base = load_quantized(pipeline["base"])
    lora = attach_lora(base, rank=4, alpha=8, target_modules=["q_proj"], dropout=0.0)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(UserError, match=r"--merged needs an adapter that merges .*\(diablo"):
        export_model(pipeline["base"], tmp_path / "lora", tmp_path / "m", merged=True)
    out = export_model(pipeline["base"], tmp_path / "lora", tmp_path / "out")
    assert torch.equal(_logits(load_exported(out)), _logits(lora.eval()))
    card = (out / "README.md").read_text()
    assert "a PEFT LORA adapter" in card and "no base fingerprint" in card
    meta = ModelCard.load(out / "README.md").data
    assert meta.library_name == "peft" and "lora" in meta.tags


def test_export_keeps_user_files_and_overwrite_replaces_only_its_own(pipeline, tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    (out / "old.safetensors").write_bytes(b"not export's")
    with pytest.raises(UserError, match=r"did not write \(notes.md, old.safetensors\)"):
        export_model(pipeline["base"], pipeline["adapter"], out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.md", "old.safetensors"]
    export_model(pipeline["base"], pipeline["adapter"], out, overwrite=True)
    export_model(pipeline["base"], pipeline["adapter"], out, overwrite=True)
    assert (out / "notes.md").read_text() == "mine"
    assert (out / "old.safetensors").read_bytes() == b"not export's"
    with pytest.raises(UserError, match=r"old\.safetensors: not listed"):
        verify_export(out)  # a stray weights file is still caught when loading
