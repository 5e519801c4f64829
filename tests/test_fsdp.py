"""`qdiablo train` under FSDP2 (accelerate launch, examples/fsdp2.yaml) on two CPU processes
(gloo), on a packed 4-bit tiny LLaMA: the same gradients and SGD training as one process on the
same global batch, AdamW within what its update rule allows for last-bit gradient differences,
each rank holding half of the packed base, a gathered adapter that a plain reload reproduces bit
for bit, and a resume that matches the uninterrupted run."""

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
# 2 FSDP processes against 1 process: FSDP promises the same gradients up to the order of the sums
# (an all-reduce over ranks against one sum in one process), i.e. a few float32 ulps of each
# tensor's largest gradient. Measured: ≤ 1.1e-6 of it at every step (2026-12-04).
GRAD_RTOL = 1e-5
LOSS_ATOL = 1e-5
BETAS, EPS = (0.9, 0.999), 1e-8  # torch AdamW's defaults, as Trainer's adamw_torch uses them


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


def _blocks(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _assert_within_grad_rounding(got: dict, want: dict, scale: float = 1.0) -> None:
    """got == want up to GRAD_RTOL of each tensor's largest entry (× scale), and not all zero."""
    assert got.keys() == want.keys()
    for key in want:
        peak = float(want[key].abs().max())
        assert peak > 0, key
        err = float((got[key] - want[key]).abs().max())
        assert err <= GRAD_RTOL * scale * peak, (key, err, peak)


def adam_step_bound(steps: int, betas: tuple[float, float] = BETAS) -> float:
    """The largest |m̂/√v̂| AdamW can take in its first `steps` steps, for any gradients.

    m_t = (1-β1)Σ β1^j g_(t-j) and v_t = (1-β2)Σ β2^j g_(t-j)²; Cauchy-Schwarz on
    Σ (β1^j/β2^(j/2))·(β2^(j/2) g) gives |m_t| ≤ (1-β1)·√(Σ (β1²/β2)^j)·√(v_t/(1-β2)), then the
    bias corrections 1/(1-β1^t) and √(1-β2^t). About 1.006 for 4 steps at (0.9, 0.999)."""
    b1, b2 = betas
    ratio = sum((b1 * b1 / b2) ** j for j in range(steps)) ** 0.5
    return (1 - b1) * ratio * ((1 - b2**steps) / (1 - b2)) ** 0.5 / (1 - b1**steps)


def adamw_tolerance(state: dict, lr: float, steps: int, grad_tol: torch.Tensor) -> torch.Tensor:
    """How far apart two AdamW runs may be, element by element, after `steps` steps whose
    gradients differ by at most `grad_tol` (absolute) at each step.

    AdamW moves an element by lr·m̂/(√v̂+ε) a step. Where the gradient is resolved far above its
    rounding, that step moves by at most ~2·δ/(√v̂+ε) when any of the gradients seen so far move
    by δ (m̂ and √v̂ are both linear in them to first order); where it is not (|g| near the rounding,
    as on near-zero DiaBlo gradients of q/k), the two runs may step in opposite directions, each
    by at most lr·adam_step_bound: that is the whole of the difference between the runs.
    `state`: the optimizer state (exp_avg_sq, step) of one run after the last step."""
    v_hat = state["exp_avg_sq"] / (1 - BETAS[1] ** float(state["step"]))
    worst = 2 * adam_step_bound(steps)
    per_step = torch.clamp(2 * steps * grad_tol / (v_hat.sqrt() + EPS), max=worst)
    return lr * steps * per_step


def _assert_adamw_close(got: dict, want: dict, optimizer_file: Path, lr: float, steps: int):
    """got == want within adamw_tolerance; most elements must be in its tight regime (< 1% of
    the worst case), so that the check can fail."""
    state = torch.load(optimizer_file, map_location="cpu", weights_only=True)["state"]
    tight = total = 0
    for key in want:
        name = next(k for k in state if k.endswith(key.removeprefix("model.")))
        peak = float(state[name]["exp_avg_sq"].max()) ** 0.5  # ~ the largest gradient
        tol = adamw_tolerance(state[name], lr, steps, torch.tensor(GRAD_RTOL * peak))
        err = (got[key] - want[key]).abs()
        assert bool((err <= tol + 1e-7 * want[key].abs().max()).all()), (
            key,
            float((err - tol).max()),
        )
        tight += int((tol < 0.01 * lr * steps * 2 * adam_step_bound(steps)).sum())
        total += tol.numel()
    assert tight >= 0.9 * total, (tight, total)


def test_fsdp_gradients_and_sgd_training_match_one_process(tmp_path, rtn_folder, math_file):
    """What FSDP guarantees: the same gradients (SGD from zero-initialised blocks: after one step
    the blocks are −lr·g) and, SGD being linear in them, the same training."""
    lr = 0.1
    sgd = dict(optimizer="sgd", lr=lr, scheduler="constant", max_grad_norm=0.0, save_steps=1)
    sgd["save_total_limit"] = None
    fsdp_out, one_out = tmp_path / "fsdp", tmp_path / "one"
    probes = _launch_fsdp(_config(rtn_folder, math_file, fsdp_out, **sgd))
    assert all(p["sharded"] and p["world_size"] == 2 for p in probes.values())
    assert all(p["packed_intact"] is True for p in probes.values())
    fsdp_results = json.loads((fsdp_out / "train_results.json").read_text())["fsdp"]
    assert fsdp_results["sharded_loading"] is True  # each rank read only its rows of the file
    single = train(TrainConfig(**_config(rtn_folder, math_file, one_out, **sgd)))

    first = "checkpoints/checkpoint-1"
    grads = {k: -v / lr for k, v in _blocks(fsdp_out / first).items()}
    _assert_within_grad_rounding(grads, {k: -v / lr for k, v in _blocks(one_out / first).items()})
    _assert_within_grad_rounding(_blocks(fsdp_out / "adapter"), _blocks(single.adapter_dir))
    torch.testing.assert_close(_losses(fsdp_out), _losses(one_out), atol=LOSS_ATOL, rtol=0)

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


def test_fsdp_adamw_matches_one_process_and_resumes(tmp_path, rtn_folder, math_file):
    """AdamW under FSDP against one process, within what its update rule allows for gradients
    that differ in their last bits (adamw_tolerance); then a resume under FSDP and in one plain
    process from the FSDP checkpoint."""
    lr, steps = 1e-2, 4
    fsdp_out = tmp_path / "fsdp"
    _launch_fsdp(_config(rtn_folder, math_file, fsdp_out))
    single = train(TrainConfig(**_config(rtn_folder, math_file, tmp_path / "one")))
    assert len(_losses(fsdp_out)) == steps
    torch.testing.assert_close(_losses(fsdp_out), _losses(tmp_path / "one"), atol=LOSS_ATOL, rtol=0)
    a = _blocks(fsdp_out / "adapter")
    optimizer = fsdp_out / "checkpoints" / f"checkpoint-{steps}" / "optimizer.pt"
    _assert_adamw_close(a, _blocks(single.adapter_dir), optimizer, lr, steps)

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
    _assert_adamw_close(_blocks(resumed_out / "adapter"), a, optimizer, lr, steps)

    # the same FSDP checkpoint resumes in one plain process (another world size, no FSDP)
    alone = tmp_path / "alone"
    (alone / "checkpoints").mkdir(parents=True)
    shutil.copy(fsdp_out / "train_config.json", alone / "train_config.json")
    shutil.copytree(
        fsdp_out / "checkpoints" / "checkpoint-2", alone / "checkpoints" / "checkpoint-2"
    )
    train(TrainConfig(**_config(rtn_folder, math_file, alone, resume="auto")))
    torch.testing.assert_close(_losses(alone)[-2:], _losses(fsdp_out)[-2:], atol=LOSS_ATOL, rtol=0)
    _assert_adamw_close(_blocks(alone / "adapter"), a, optimizer, lr, steps)


def test_fsdp_lora_on_float_stored_packed_base_with_bf16_policy(tmp_path, rtn_folder, math_file):
    """GPTQ-LoRA under FSDP2 with the packed bytes stored as bf16 (bitsandbytes-style) and a
    bf16 mixed-precision policy: the gathered packed bytes still equal the file's, and the
    saved LoRA folder loads without FSDP and reproduces the gathered weights bit for bit."""
    from qdiablo.adapters.lora import load_lora

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
    from qdiablo.diablo.fingerprint import base_fingerprint
    from qdiablo.models import packed_base_on_meta
    from qdiablo.train.fsdp_loading import file_state_of
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
