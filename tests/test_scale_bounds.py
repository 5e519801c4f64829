"""The memory bounds of docs/scale.md (benchmarks/scale.py) are computed from real sizes: the
packed size P is the size of the file `qdiablo quantize` writes, B the block's float32 size,
A the activations `quantize_model` keeps; `--bounds-only` evaluates them at 7B and 70B."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_quantize_resume import load_benchmark

from qdiablo import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scale():
    return load_benchmark("scale")


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (2, -1), (3, 64)])
def test_packed_bytes_is_the_size_of_the_saved_weights(scale, tmp_path, bits, group):
    from transformers import AutoConfig

    from quantizers.shards import ShardedCheckpoint

    model = load_benchmark("synthetic_llama").write_synthetic("tiny", tmp_path / "m")
    out = tmp_path / "q"
    argv = ["quantize", "--model", str(model), "--output", str(out), "--method", "rtn"]
    assert cli.main([*argv, "--bits", str(bits), "--group-size", str(group)]) == 0
    tensors = ShardedCheckpoint(out).read(ShardedCheckpoint(out).keys())
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    shape = scale.Shape.of(AutoConfig.from_pretrained(model))
    assert scale.packed_bytes(shape, bits, group, float_bytes=4) == stored
    block = sum(p.numel() for p in load_tiny_block(model))
    assert scale.block_fp32(shape) == 4 * block
    assert shape.params == sum(
        t.numel() for k, t in ShardedCheckpoint(model).read(ShardedCheckpoint(model).keys()).items()
    )


def load_tiny_block(folder):
    from transformers import AutoModelForCausalLM

    return list(AutoModelForCausalLM.from_pretrained(folder).model.layers[0].parameters())


def test_activation_bytes_are_what_quantize_model_keeps(scale, tiny_llama):
    from quantizers.calibration import capture_block_inputs, find_decoder_blocks

    calib = [torch.randint(3, 200, (4, 16)), torch.randint(3, 200, (2, 16))]
    _, blocks = find_decoder_blocks(tiny_llama)
    hidden, _ = capture_block_inputs(tiny_llama, blocks, calib, torch.device("cpu"))
    kept = sum(h.numel() * h.element_size() for h in hidden)
    shape = scale.Shape.of(tiny_llama.config)
    assert scale.activation_bytes(shape, 6, 16, 4) == kept
    half, _ = capture_block_inputs(tiny_llama, blocks, calib, torch.device("cpu"), torch.bfloat16)
    assert scale.activation_bytes(shape, 6, 16, 2) == sum(h.numel() * 2 for h in half)


def test_the_70b_bounds_are_under_48_gb(scale):
    table = scale.bounds_at_scale()
    row = next(line for line in table.splitlines() if "70B" in line)
    cells = [float(c) for c in row.strip("|").split("|")[1:]]
    host, device, recon = cells[4], cells[5], cells[6]
    assert host * 1024**3 < 48e9 and device * 1024**3 < 48e9 and recon * 1024**3 < 48e9
    assert f"| {host:.1f} | {device:.1f} | {recon:.1f} |" in (REPO / "docs/scale.md").read_text()
