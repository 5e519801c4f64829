"""Train defaults that fit (issue 19): `auto` settings resolved for the machine. On the CPU every
setting is what it was before the defaults existed (so CPU runs, and resumes of older runs, are
unchanged); on a GPU (torch's CUDA queries answered as a 24 GiB Ampere card would) bf16
compute and weights, checkpointing for a quantized base, and the planner's micro-batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qdiablo.errors import UserError
from qdiablo.memory.plan import GiB, MemoryPlan
from qdiablo.memory.settings import PlanSettings
from qdiablo.memory.shapes import load_source
from qdiablo.train.config import TrainConfig
from qdiablo.train.runtime import resolve_runtime

BEFORE = {"precision": "fp32", "dtype": "float32", "gradient_checkpointing": False}


def test_the_cpu_keeps_every_earlier_default(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for base in ("fp", "gptq", "nf4"):
        resolved, runtime = resolve_runtime(TrainConfig(base=base))
        assert {k: getattr(resolved, k) for k in BEFORE} == BEFORE
        assert resolved.micro_batch_size is None and runtime.micro_batch_from == "batch"
        assert resolved.device == "cpu"
    given = TrainConfig(precision="bf16", gradient_checkpointing=True, micro_batch_size=4)
    resolved, runtime = resolve_runtime(given)
    assert (resolved.precision, resolved.gradient_checkpointing, resolved.micro_batch_size) == (
        "bf16",
        True,
        4,
    )
    assert runtime.micro_batch_from == "flag"


class FakeGPU:
    total_memory = 24 * GiB


@pytest.fixture
def gpu(monkeypatch):
    """torch's CUDA queries answered as for one 24 GiB bf16-capable GPU (no CUDA is used)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: FakeGPU())
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def test_a_gpu_gets_bf16_checkpointing_and_the_planners_micro_batch(gpu, tmp_path):
    folder = tmp_path / "tinyllama"
    from qdiablo.memory.shapes import preset_config

    preset_config("tinyllama-1.1b").save_pretrained(folder)  # config.json only: all the plan reads
    config = TrainConfig(model=str(folder), base="fp", batch_size=16, max_length=2048)
    resolved, runtime = resolve_runtime(config)
    assert (resolved.precision, resolved.dtype, resolved.device) == ("bf16", "bfloat16", "cuda:0")
    assert resolved.gradient_checkpointing is False  # a float base keeps it off
    assert torch.backends.cuda.matmul.allow_tf32  # TF32 for the fp32 matmuls that remain
    micro = resolved.micro_batch_size
    assert runtime.micro_batch_from == "planner" and 16 % micro == 0
    settings = PlanSettings(base="fp", seq_len=2048, checkpointing=False)
    plan = MemoryPlan(load_source(str(folder)), settings)
    fits = plan.largest_micro_batch(24 * GiB)
    assert runtime.planner["fits"] == fits and micro == max(
        d for d in (1, 2, 4, 8, 16) if d <= fits
    )

    # --distill: the full-precision teacher shares the GPU, so fewer examples fit a pass.
    _, distilled = resolve_runtime(dataclasses.replace(config, distill=str(folder)))
    with_teacher = MemoryPlan(load_source(str(folder)), dataclasses.replace(settings, distill=True))
    assert distilled.planner["fits"] == with_teacher.largest_micro_batch(24 * GiB) < fits

    resolved, _ = resolve_runtime(dataclasses.replace(config, base="nf4"))
    assert resolved.gradient_checkpointing is True  # a quantized base: on
    resolved, runtime = resolve_runtime(dataclasses.replace(config, micro_batch_size=2))
    assert resolved.micro_batch_size == 2 and runtime.micro_batch_from == "flag"


def test_a_named_gpu_must_be_this_processs(gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="LOCAL_RANK") as e:
        resolve_runtime(TrainConfig(device="cuda:1"))
    assert "CUDA_VISIBLE_DEVICES=1" in e.value.hint


def test_the_flag_parses_as_auto_on_off(tmp_path):
    from qdiablo.cli import parse_args

    args = parse_args(["train"])
    assert (args.precision, args.dtype, args.device) == ("auto", "auto", "auto")
    assert args.gradient_checkpointing is None
    assert parse_args(["train", "--gradient-checkpointing"]).gradient_checkpointing is True
    assert parse_args(["train", "--no-gradient-checkpointing"]).gradient_checkpointing is False
    cfg = tmp_path / "t.yaml"
    cfg.write_text("gradient_checkpointing: null\nprecision: auto\n")
    args = parse_args(["train", "--config", str(cfg)])
    assert args.gradient_checkpointing is None and args.precision == "auto"
