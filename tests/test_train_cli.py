"""`qdiablo train` from the command line, and on two processes with `accelerate launch`."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qdiablo import cli
from qdiablo.errors import UserError
from qdiablo.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


def _flags(model_dir, data, output, **extra) -> list[str]:
    flags = {
        "model": model_dir,
        "data": data,
        "decontaminate": "none",
        "num-blocks": 8,
        "max-steps": 3,
        "batch-size": 8,
        "lr": 1e-2,
        "dropout": 0.0,
        "max-length": 256,
        "save-steps": 0,
        "logging-steps": 1,
        "seed": 5,
        "output": output,
        **extra,
    }
    out = []
    for k, v in flags.items():
        out += [f"--{k}", str(v)]
    return [*out, "--no-progress"]


def test_cli_train_with_yaml_config(tmp_path, tiny_model_dir, math_file):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    cfg = tmp_path / "train.yaml"
    cfg.write_text("base: nf4\nadapter: lora\nrank: 4\nmatch_params: false\nmax_steps: 2\n")
    out = tmp_path / "run"
    argv = ["train", "--config", str(cfg), "--model", str(tiny_model_dir), "--data", str(math_file)]
    argv += ["--decontaminate", "none", "--max-length", "256", "--batch-size", "4"]
    argv += ["--output", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    results = json.loads((out / "train_results.json").read_text())
    assert (results["adapter"], results["base"], results["global_step"]) == ("lora", "nf4", 2)
    # r·Σ(in+out) over q,k,v,up,down of 2 blocks: 4·2·(128 + 96 + 96 + 192 + 192) = 5,632
    assert results["trainable_parameters"] == 5632 and results["budget"]["rank"] == 4
    assert results["budget"]["num_adapted_layers"] == 10
    assert results["other_method"]["adapter"] == "diablo"
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_yaml_booleans_follow_their_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gradient_checkpointing: true\nno-progress: true\nanswer_suffix: false\n")
    args = cli.parse_args(["train", "--config", str(cfg)])
    assert (args.gradient_checkpointing, args.progress, args.answer_suffix) == (True, False, False)
    args = cli.parse_args(["train", "--config", str(cfg), "--progress"])
    assert args.progress is True
    cfg.write_text("gradient_checkpointing: yes please\n")
    with pytest.raises(UserError, match="must be true or false"):
        cli.parse_args(["train", "--config", str(cfg)])


def test_cli_errors_are_one_line(tmp_path, tiny_model_dir, capsys):
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.json")]
    assert cli.main([*argv, "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qdiablo: error: data file not found") and "hint:" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "input": "", "answer": "1"}\n')
    assert cli.main(["train", "--model", str(tiny_model_dir), "--data", str(bad)]) == 2
    assert "record 0: missing field 'output'" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, tiny_model_dir, math_file):
    """accelerate launch --multi_gpu on CPU (gloo): 2 × micro-batch 4 == 1 × micro-batch 8."""
    two = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    command = [*launch, "-m", "qdiablo", "train", *_flags(tiny_model_dir, math_file, two)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((two / "train_results.json").read_text())
    assert results["devices"] == 2 and results["micro_batch_size"] == 4

    one = TrainConfig(
        model=str(tiny_model_dir),
        data=[str(math_file)],
        decontaminate=["none"],
        num_blocks=8,
        max_steps=3,
        batch_size=8,
        micro_batch_size=8,
        lr=1e-2,
        dropout=0.0,
        max_length=256,
        save_steps=0,
        seed=5,
        progress=False,
        output=str(tmp_path / "one"),
    )
    single = train(one)
    assert single.results["devices"] == 1
    a = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(single.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].abs().max() > 0
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-4, msg=key)
    assert results["throughput"]["tokens_seen"] == (single.results["throughput"]["tokens_seen"])
