"""`qdiablo train` on the real SmolLM2-135M-Instruct (GGUF, quantized to NF4 at load)."""

import json

import pytest
from safetensors.torch import load_file

from qdiablo import cli

pytestmark = pytest.mark.slow

COMMON = [
    "--model", "smollm2", "--base", "nf4", "--max-records", "4", "--max-length", "160",
    "--batch-size", "2", "--max-steps", "4", "--warmup", "0", "--logging-steps", "1",
    "--save-steps", "2", "--gradient-checkpointing", "--no-progress", "--seed", "3",
]  # fmt: skip


@pytest.mark.parametrize(
    "adapter_flags",
    [
        ["--adapter", "diablo", "--num-blocks", "64", "--lr", "3e-3"],
        ["--adapter", "lora", "--num-blocks", "64", "--match-params", "--lr", "3e-3"],
    ],
    ids=["diablo", "lora-matched"],
)
def test_train_on_smollm2_nf4(tmp_path, adapter_flags, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *COMMON, *adapter_flags, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "decontamination: dropped" in printed
    res = json.loads((out / "train_results.json").read_text())
    assert res["base_linear_layers"]["layers"] == 7 * 30
    assert res["budget"]["num_adapted_layers"] == 5 * 30
    # q,k,v,up,down of SmolLM2 at N=64: 1,088,640 blocks; the matched LoRA rank is 5
    assert res["budget"]["diablo_trainable_parameters"] == 1_088_640
    assert res["budget"]["rank"] == (5 if "--match-params" in adapter_flags else 64)
    expected = 1_088_640 if adapter_flags[1] == "diablo" else 5 * 207_360
    assert res["trainable_parameters"] == expected
    assert res["last_logged_loss"] < res["first_logged_loss"]
    assert res["throughput"]["tokens_per_second"] > 0
    # 4-bit packed layers: half a byte per weight, plus absmax per 64 and nested statistics
    per_weight = res["base_linear_layers"]["bytes"] / res["base_linear_layers"]["weights"]
    assert 0.5 < per_weight < 0.6
    tensors = load_file(str(out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"))
    assert sum(t.numel() for t in tensors.values()) == expected
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert len(final) == (150 if adapter_flags[1] == "diablo" else 300)
