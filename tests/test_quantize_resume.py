"""`qdiablo quantize` streams the model from its shards and resumes a killed run.

- The streamed run (blocks read from the safetensors shards one at a time) writes the same folder,
  byte for byte, as the whole model quantized in memory by the library (the code path of
  qdiablo before streaming), for a float32 model and a sharded bfloat16 one with a tied head.
- At most one decoder block holds full-precision weights at any time.
- A run killed after block k (an exception injected after the block is saved, or a subprocess
  killed with SIGKILL at a point read from its own log), run again with the same command,
  resumes at block k+1 and writes the same folder as an uninterrupted run, with and without
  reconstruction. Partial work of other settings is refused, naming the difference.

Report files hold wall-clock times, which differ between any two runs: they are compared with
those fields masked; every other file byte for byte.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, make_tokenizer

from qdiablo import cli
from quantizers import load_quantized, quantize_model, save_quantized
from quantizers.resume import PARTIAL_DIR, BlockStore

TEXT = "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning.\n\n"
REPO = Path(__file__).resolve().parents[1]


def _masked(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name == "quantization_report.json":

        def strip(o):
            if isinstance(o, dict):
                return {k: strip(v) for k, v in o.items() if "seconds" not in k}
            return [strip(v) for v in o] if isinstance(o, list) else o

        return json.dumps(strip(json.loads(data)), sort_keys=True).encode()
    if path.name == "quantization_report.md":
        return re.sub(rb"(\d+ s\)|steps in \d+ s)", b"T s", data)
    return data


def assert_same_folder(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir() if not p.name.startswith(".qdiablo"))
    assert names == sorted(p.name for p in b.iterdir() if not p.name.startswith(".qdiablo"))
    assert "model.safetensors" in names and PARTIAL_DIR not in names
    for name in names:
        assert _masked(a / name) == _masked(b / name), name


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 3-block float32 LLaMA (one file), a 2-block bfloat16 one with a tied head saved in
    shards, benchmarks/synthetic_llama.py's tiny checkpoint (bfloat16 shards), and a
    calibration text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("resume")
    make_tiny_llama(seed=3, layers=3).save_pretrained(root / "fp32")
    make_tokenizer().save_pretrained(root / "fp32")
    torch.manual_seed(4)
    config = LlamaConfig(
        vocab_size=261,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    tied = LlamaForCausalLM(config).to(torch.bfloat16)
    tied.save_pretrained(root / "bf16-sharded", max_shard_size="20KB")
    make_tokenizer().save_pretrained(root / "bf16-sharded")
    assert (root / "bf16-sharded/model.safetensors.index.json").is_file()
    synthetic = load_benchmark("synthetic_llama")
    synthetic.write_synthetic("tiny", root / "synthetic", seed=1, max_shard_size=60_000)
    assert len(list((root / "synthetic").glob("model-*.safetensors"))) > 1
    (root / "calib.txt").write_text(TEXT * 40)
    return root


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (they are scripts, not a package)."""
    import importlib.util

    key = f"benchmarks_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _argv(models: Path, model: str, out: Path, *flags: str) -> list[str]:
    return [
        "quantize",
        "--model",
        str(models / model),
        "--output",
        str(out),
        "--calib",
        str(models / "calib.txt"),
        "--calib-samples",
        "6",
        "--calib-seq-len",
        "32",
        "--calib-batch-size",
        "2",
        *flags,
    ]


@pytest.mark.parametrize(
    ("model", "flags", "dtype"),
    [
        ("fp32", ["--bits", "4", "--group-size", "32", "--magr", "--magr-iters", "5"], "float32"),
        ("bf16-sharded", ["--method", "rtn", "--bits", "3", "--group-size", "32"], "bfloat16"),
        (
            "synthetic",
            ["--bits", "2", "--group-size", "32", "--calib-dtype", "float32", "--calib-offload"],
            "float32",
        ),
        (  # the end-to-end stage's teacher runs the streamed model block by block
            "fp32",
            ["--bits", "2", "--group-size", "32", "--reconstruct", "--recon-steps", "2"],
            "float32",
        ),
    ],
    ids=["fp32", "bf16-sharded", "synthetic", "fp32-reconstruct-e2e"],
)
def test_streamed_quantize_writes_the_folder_of_the_whole_model_path(
    models, tmp_path, model, flags, dtype, caplog
):
    from qdiablo.cli import build_parser
    from qdiablo.commands.quantize import _calib_dtype, calibration_for, quant_config_from_args
    from qdiablo.models import load_model, load_tokenizer

    argv = _argv(models, model, tmp_path / "streamed", *flags, "--dtype", dtype)
    with caplog.at_level(logging.INFO, logger="qdiablo.streamed"):
        assert cli.main(argv) == 0
    assert any("block by block" in r.getMessage() for r in caplog.records)
    # The reference: the whole model in memory, as `qdiablo quantize` loaded it before.
    args = build_parser()[0].parse_args(argv)
    tokenizer = load_tokenizer(str(models / model))
    whole = load_model(str(models / model), dtype=dtype)
    config = quant_config_from_args(args)
    calib, heldout = calibration_for(args, config, tokenizer, whole)  # the command's windows
    calib_dtype = _calib_dtype(args.calib_dtype, torch.device("cpu"))
    quantize_model(whole, calib, config, calib_dtype=calib_dtype, heldout_data=heldout)
    save_quantized(whole, tmp_path / "whole", tokenizer)
    assert_same_folder(tmp_path / "streamed", tmp_path / "whole")


@pytest.mark.parametrize("reconstruct", [False, True], ids=["gptq", "reconstruct-e2e"])
def test_one_block_at_a_time_is_full_precision(models, tmp_path, monkeypatch, reconstruct):
    from qdiablo.streamed import StreamedModel

    seen = []
    load = StreamedModel.load_block

    def counting(self, i, device="cpu"):
        block = load(self, i, device)
        real = [
            j
            for j, b in enumerate(self.model.model.layers)
            if any(isinstance(m, torch.nn.Linear) and not m.weight.is_meta for m in b.modules())
        ]
        seen.append(real)
        return block

    monkeypatch.setattr(StreamedModel, "load_block", counting)
    argv = _argv(models, "fp32", tmp_path / "q", "--bits", "4", "--group-size", "32")
    if reconstruct:  # the end-to-end stage's teacher reads every block first, one at a time
        argv += ["--reconstruct", "--recon-steps", "2"]
    assert cli.main(argv) == 0
    # block i, and no other, holds float weights when it is read
    assert seen == [[0], [1], [2]] * (2 if reconstruct else 1)
    model = load_quantized(tmp_path / "q")
    assert not any(type(m) is torch.nn.Linear for m in model.model.layers.modules())


def _kill_after(monkeypatch, k: int) -> None:
    """Make the run die right after block k is saved (as a crash or an OOM kill would)."""
    save = BlockStore.save

    def dying(self, index, *a, **kw):
        save(self, index, *a, **kw)
        if index == k:
            raise RuntimeError(f"killed after block {index}")

    monkeypatch.setattr(BlockStore, "save", dying)


@pytest.mark.parametrize(
    "flags",
    [
        ["--bits", "4", "--group-size", "32", "--magr", "--magr-iters", "5"],
        ["--bits", "2", "--group-size", "32", "--reconstruct", "--recon-steps", "4"],
    ],
    ids=["gptq-magr", "reconstruct"],
)
def test_a_killed_quantize_resumes_to_the_same_folder(models, tmp_path, monkeypatch, flags, caplog):
    assert cli.main(_argv(models, "fp32", tmp_path / "whole", *flags)) == 0
    out = tmp_path / "resumed"
    argv = _argv(models, "fp32", out, *flags)
    with monkeypatch.context() as m:
        _kill_after(m, 1)
        with pytest.raises(RuntimeError, match="killed after block 1"):
            cli.main(argv)
    partial = sorted(p.name for p in (out / PARTIAL_DIR).glob("block-*"))
    assert partial == ["block-00000.safetensors", "block-00001.safetensors"]
    assert not (out / "model.safetensors").exists()
    quantized = []
    from quantizers import block_loop

    original = block_loop.quantize_block

    def recording(block, name, *a, **kw):
        quantized.append(name)
        return original(block, name, *a, **kw)

    monkeypatch.setattr(block_loop, "quantize_block", recording)
    with caplog.at_level(logging.INFO):
        assert cli.main(argv) == 0
    assert quantized == ["model.layers.2"]  # blocks 0 and 1 were not quantized again
    assert any("resuming: 2 of 3 blocks" in r.getMessage() for r in caplog.records)
    assert_same_folder(out, tmp_path / "whole")
    marker = json.loads((out / ".qdiablo-quantize.json").read_text())
    assert marker["complete"] and PARTIAL_DIR not in marker["files"]


def test_partial_work_of_other_settings_is_refused_naming_the_difference(
    models, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "q"
    with monkeypatch.context() as m:
        _kill_after(m, 0)
        with pytest.raises(RuntimeError):
            cli.main(_argv(models, "fp32", out, "--bits", "4", "--group-size", "32"))
    capsys.readouterr()
    other = _argv(models, "fp32", out, "--bits", "3", "--group-size", "32")
    assert cli.main(other) == 2
    err = capsys.readouterr().err
    assert "holds the partial work of a different quantize" in err
    assert "config.bits: this run 3, the folder's 4" in err and "--overwrite" in err
    assert (out / PARTIAL_DIR / "block-00000.safetensors").is_file()  # nothing lost
    assert cli.main([*other, "--overwrite"]) == 0  # discards it and starts over
    assert not (out / PARTIAL_DIR).exists()
    assert {m.bits for m in load_quantized(out).modules() if hasattr(m, "qweight")} == {3}

    # A run that died before finishing any block leaves nothing to protect: other settings run.
    def dead(*_a, **_kw):
        raise RuntimeError("died in block 0")

    fresh = tmp_path / "fresh"
    with monkeypatch.context() as m:
        m.setattr("quantizers.block_loop.quantize_block", dead)
        with pytest.raises(RuntimeError, match="died in block 0"):
            cli.main(_argv(models, "fp32", fresh, "--bits", "4", "--group-size", "32"))
    assert (fresh / PARTIAL_DIR / "state.json").is_file()
    assert cli.main(_argv(models, "fp32", fresh, "--bits", "3", "--group-size", "32")) == 0


def test_a_quantize_killed_by_sigkill_resumes(models, tmp_path):
    """A real kill: the child is SIGKILLed as soon as its log says a block was saved."""
    flags = ["--bits", "4", "--group-size", "32", "--magr", "--magr-iters", "5"]
    assert cli.main(_argv(models, "fp32", tmp_path / "whole", *flags)) == 0
    argv = _argv(models, "fp32", tmp_path / "killed", *flags)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "qdiablo", *argv],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        for line in child.stderr:
            if "block 0 saved" in line:
                child.send_signal(signal.SIGKILL)
                break
    finally:
        child.wait(timeout=120)
    assert child.returncode == -signal.SIGKILL
    saved = sorted((tmp_path / "killed" / PARTIAL_DIR).glob("block-*"))
    assert saved and not (tmp_path / "killed" / "model.safetensors").exists()
    assert cli.main(argv) == 0
    assert_same_folder(tmp_path / "killed", tmp_path / "whole")


def test_qdiablo_run_resumes_an_interrupted_quantize_stage(models, tmp_path, monkeypatch):
    import yaml

    from qdiablo.pipeline.run import run_pipeline

    quantize = {"bits": 4, "group_size": 32, "calib": str(models / "calib.txt")}
    quantize.update({"calib_samples": 6, "calib_seq_len": 32, "calib_batch_size": 2})
    config = tmp_path / "run.yaml"
    out = tmp_path / "out"
    config.write_text(
        yaml.safe_dump({"output": str(out), "model": str(models / "fp32"), "quantize": quantize})
    )
    with monkeypatch.context() as m:
        _kill_after(m, 0)
        with pytest.raises(RuntimeError):
            run_pipeline(config)
    assert (out / "quantized" / PARTIAL_DIR / "block-00000.safetensors").is_file()
    [outcome] = run_pipeline(config)
    assert outcome.status == "resumed"
    assert (
        cli.main(_argv(models, "fp32", tmp_path / "whole", "--bits", "4", "--group-size", "32"))
        == 0
    )
    assert_same_folder(out / "quantized", tmp_path / "whole")


@pytest.mark.slow
def test_smollm2_with_reconstruction_resumes_to_the_same_folder(tmp_path, monkeypatch, caplog):
    """The real SmolLM2-135M (loaded whole from its GGUF file), RTN + reconstruction, killed
    after block 13 of 30. benchmarks/resume_smollm2.py does the demo's MagR+GPTQ+reconstruction
    with a real SIGKILL (benchmarks/results/resume-smollm2.md)."""
    flags = ["--model", "smollm2", "--method", "rtn", "--bits", "2", "--group-size", "64"]
    flags += ["--reconstruct", "--recon-steps", "4", "--calib-samples", "8"]
    flags += ["--calib-seq-len", "64", "--calib-batch-size", "4"]
    assert cli.main(["quantize", *flags, "--output", str(tmp_path / "whole")]) == 0
    argv = ["quantize", *flags, "--output", str(tmp_path / "resumed")]
    with monkeypatch.context() as m:
        _kill_after(m, 13)
        with pytest.raises(RuntimeError, match="killed after block 13"):
            cli.main(argv)
    with caplog.at_level(logging.INFO):
        assert cli.main(argv) == 0
    assert any("resuming: 14 of 30 blocks" in r.getMessage() for r in caplog.records)
    assert_same_folder(tmp_path / "resumed", tmp_path / "whole")
    report = json.loads((tmp_path / "resumed/quantization_report.json").read_text())
    assert len(report["reconstruction"]) == 30 and len(report["layers"]) == 30 * 7


def test_activations_kept_in_bfloat16_feed_every_block_in_bfloat16(models):
    """What a GPU run does (act_dtype "calib"): the activations between blocks are bfloat16,
    and the result stays close to the float32-activation one."""
    from quantizers import QuantConfig
    from quantizers.calibration import tokenize_calibration

    calib = tokenize_calibration(make_tokenizer(), [TEXT * 40], 6, 32, 2)
    config = QuantConfig(bits=4, group_size=32)
    errors = {}
    for act in (None, torch.bfloat16):
        model = make_tiny_llama(seed=3, layers=3)
        seen: list[torch.dtype] = []

        def record(_m, args, _kw, seen=seen):
            seen.append(args[0].dtype)

        for block in model.model.layers:
            block.register_forward_pre_hook(record, with_kwargs=True)
        quantize_model(model, calib, config, calib_dtype=torch.bfloat16, act_dtype=act)
        # the first calls are the capture's (the embeddings' float32 output, then stored as act)
        assert set(seen[len(calib) :]) == {torch.float32 if act is None else torch.bfloat16}
        errors[act] = [r.rel_error for r in model.quantization_report.layers]
    for a, b in zip(errors[None], errors[torch.bfloat16]):
        assert abs(a - b) <= 0.05 * a
