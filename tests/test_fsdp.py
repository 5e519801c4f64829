"""`qdiablo train` under FSDP2 (accelerate launch, examples/fsdp2.yaml) on two CPU processes
(gloo), on a packed 4-bit tiny LLaMA: the same losses and blocks as one process on the same
global batch, each rank holding half of the packed base, a gathered adapter that a plain reload
reproduces bit for bit, and a resume that matches the uninterrupted run."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, make_tokenizer
from safetensors.torch import load_file

from qdiablo import DiaBloModel
from qdiablo.errors import UserError
from qdiablo.train import TrainConfig, train
from qdiablo.train.bases import load_training_base
from qdiablo.train.fsdp import check_fsdp_launch
from quantizers import QuantConfig, QuantLinear, quantize_model, save_quantized

REPO = Path(__file__).resolve().parents[1]
# Float tolerance between 2 FSDP processes and 1 process: the same sums in another order.
LOSS_ATOL, BLOCK_ATOL, BLOCK_RTOL = 1e-5, 1e-6, 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rtn_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp") / "rtn4"
    model = quantize_model(
        make_tiny_llama(seed=0), None, QuantConfig(method="rtn", bits=4, group_size=32)
    )
    save_quantized(model, folder, make_tokenizer())
    return folder


def _config(folder, data, output, **extra) -> dict:
    cfg = {
        "model": str(folder),
        "base": "rtn",
        "data": [str(data)],
        "decontaminate": ["none"],
        "num_blocks": 8,
        "max_steps": 4,
        "batch_size": 8,
        "lr": 1e-2,
        "warmup": 0,
        "dropout": 0.0,
        "max_length": 256,
        "save_steps": 2,
        "logging_steps": 1,
        "seed": 5,
        "progress": False,
        "output": str(output),
    }
    return {**cfg, **extra}


def _launch_fsdp(config: dict, mixed_precision: str = "no") -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    command += ["--config_file", str(REPO / "examples" / "fsdp2.yaml")]
    command += ["--num_processes", "2", "--mixed_precision", mixed_precision]
    command += ["--main_process_port", str(_free_port())]
    command += [str(REPO / "tests" / "fsdp_worker.py"), json.dumps(config)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(config["output"])
    return {r: json.loads((out / f"fsdp_probe_{r}.json").read_text()) for r in (0, 1)}


def _losses(output: Path) -> list[float]:
    records = [json.loads(x) for x in (output / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_fsdp_two_processes_match_one_process_and_resume(tmp_path, rtn_folder, math_file):
    fsdp_out = tmp_path / "fsdp"
    probes = _launch_fsdp(_config(rtn_folder, math_file, fsdp_out))
    assert all(p["sharded"] and p["world_size"] == 2 for p in probes.values())
    assert all(p["packed_intact"] is True for p in probes.values())
    fsdp_results = json.loads((fsdp_out / "train_results.json").read_text())["fsdp"]
    assert fsdp_results["sharded_loading"] is True  # each rank read only its rows of the file

    # one process, the same global batch of 8
    single = train(TrainConfig(**_config(rtn_folder, math_file, tmp_path / "one")))
    assert len(_losses(fsdp_out)) == 4
    torch.testing.assert_close(_losses(fsdp_out), _losses(tmp_path / "one"), atol=LOSS_ATOL, rtol=0)
    a = load_file(fsdp_out / "adapter" / "adapter_model.safetensors")
    b = load_file(single.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].abs().max() > 0
        torch.testing.assert_close(a[key], b[key], atol=BLOCK_ATOL, rtol=BLOCK_RTOL, msg=key)

    # each rank holds about half of the packed base (measured on its local shards)
    whole = sum(
        m.packed_bytes() - (0 if m.bias is None else m.bias.numel() * m.bias.element_size())
        for m in single.model.modules()
        if isinstance(m, QuantLinear)
    )
    for p in probes.values():
        assert 0.45 * whole <= p["packed_base_bytes"] <= 0.55 * whole, (p, whole)

    # the gathered adapter == a reload of the saved folder onto a plain (unsharded) base
    gathered = torch.load(fsdp_out / "gathered.pt", weights_only=True)
    reloaded = DiaBloModel.from_pretrained(
        load_training_base("rtn", str(rtn_folder)).model, fsdp_out / "adapter"
    )
    blocks = {f"model.{k}": v for k, v in reloaded.adapter_state_dict().items()}
    assert blocks.keys() == gathered.keys()
    assert all(torch.equal(blocks[k], gathered[k]) for k in blocks)

    # stop after step 2, resume under FSDP: the same steps 3-4 and the same final blocks
    resumed_out = tmp_path / "resumed"
    (resumed_out / "checkpoints").mkdir(parents=True)
    shutil.copy(fsdp_out / "train_config.json", resumed_out / "train_config.json")
    shutil.copytree(
        fsdp_out / "checkpoints" / "checkpoint-2", resumed_out / "checkpoints" / "checkpoint-2"
    )
    _launch_fsdp(_config(rtn_folder, math_file, resumed_out, resume="auto"))
    torch.testing.assert_close(
        _losses(resumed_out)[-2:], _losses(fsdp_out)[-2:], atol=LOSS_ATOL, rtol=0
    )
    c = load_file(resumed_out / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(c[key], a[key], atol=BLOCK_ATOL, rtol=BLOCK_RTOL, msg=key)

    # the same FSDP checkpoint resumes in one plain process (another world size, no FSDP)
    alone = tmp_path / "alone"
    (alone / "checkpoints").mkdir(parents=True)
    shutil.copy(fsdp_out / "train_config.json", alone / "train_config.json")
    shutil.copytree(
        fsdp_out / "checkpoints" / "checkpoint-2", alone / "checkpoints" / "checkpoint-2"
    )
    train(TrainConfig(**_config(rtn_folder, math_file, alone, resume="auto")))
    torch.testing.assert_close(_losses(alone)[-2:], _losses(fsdp_out)[-2:], atol=LOSS_ATOL, rtol=0)
    d = load_file(alone / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(d[key], a[key], atol=BLOCK_ATOL, rtol=BLOCK_RTOL, msg=key)


def test_fsdp_lora_on_float_stored_packed_base_with_bf16_policy(tmp_path, rtn_folder, math_file):
    """GPTQ-LoRA under FSDP2 with the packed bytes stored as bf16 (bitsandbytes-style) and a
    bf16 mixed-precision policy: the gathered packed bytes still equal the file's, and the
    saved LoRA folder loads without FSDP and reproduces the gathered weights bit for bit."""
    from qdiablo.train.adapters import load_lora

    out = tmp_path / "lora"
    config = _config(
        rtn_folder,
        math_file,
        out,
        adapter="lora",
        rank=4,
        max_steps=2,
        save_steps=0,
        packed_storage="bfloat16",
        precision="bf16",
    )
    probes = _launch_fsdp(config, mixed_precision="bf16")
    assert all(p["sharded"] and p["packed_intact"] is True for p in probes.values())
    gathered = torch.load(out / "gathered.pt", weights_only=True)
    assert gathered and all(".lora_" in k for k in gathered)
    assert any(v.abs().max() > 0 for k, v in gathered.items() if "lora_B" in k)  # it trained
    reloaded = load_lora(load_training_base("rtn", str(rtn_folder)).model, str(out / "adapter"))
    params = dict(reloaded.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in gathered.items())


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_fingerprint_read_from_the_files_equals_a_loaded_bases(tmp_path, checkpoint_format):
    """Sharded loading fingerprints the base from a few sampled rows of the files (v1 zero
    points converted as load_quantized does): the same sha256 as on a loaded base."""
    from qdiablo import DiaBloConfig, get_diablo_model
    from qdiablo.diablo.model import base_fingerprint
    from qdiablo.train.fsdp_loading import file_state_of, packed_base_on_meta
    from quantizers import load_quantized

    config = QuantConfig(method="rtn", bits=2, group_size=32, checkpoint_format=checkpoint_format)
    save_quantized(quantize_model(make_tiny_llama(seed=1), None, config), tmp_path / "q")
    adapter = DiaBloConfig(num_blocks=8, target_modules=["q_proj", "v_proj", "down_proj"])
    loaded = get_diablo_model(load_quantized(tmp_path / "q"), adapter)
    meta = packed_base_on_meta(str(tmp_path / "q"), torch.float32, torch.int32)
    on_meta = get_diablo_model(meta, adapter)
    assert on_meta.base_fingerprint != loaded.base_fingerprint  # no data on meta
    targets = [name for name, _ in on_meta.diablo_layers()]
    from_files = base_fingerprint(on_meta.model, targets, file_state_of(meta, meta._qdiablo_files))
    assert from_files == loaded.base_fingerprint


def test_fsdp1_and_nf4_are_refused_clearly(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UserError, match="FSDP version 1 is not supported") as e:
        check_fsdp_launch("gptq")
    assert "fsdp_version: 2" in e.value.hint
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(UserError, match="--base nf4 cannot train under FSDP"):
        check_fsdp_launch("nf4")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with pytest.raises(UserError, match="cpu_ram_efficient_loading"):
        check_fsdp_launch("rtn")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    assert check_fsdp_launch("rtn") and check_fsdp_launch("fp")
    # a float storage that a mixed-precision policy would cast: refused; int32 never is
    with pytest.raises(UserError, match="FSDP would cast the stored packed bytes"):
        check_fsdp_launch("gptq", "float16", "bf16")
    assert check_fsdp_launch("gptq", "bfloat16", "bf16")
    assert check_fsdp_launch("gptq", "int32", "bf16")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert not check_fsdp_launch("nf4")
