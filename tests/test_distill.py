"""`qdiablo train --distill`: KL(teacher ‖ student) against a reference, zero for a student equal
to its teacher, mixed with the LM loss by --distill-weight, and lowering the KL when it trains."""

from __future__ import annotations

import json

import pytest
import torch

from qdiablo.errors import UserError
from qdiablo.train.distill import distillation_loss, next_token_mask


def test_distillation_loss_against_a_written_out_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    p = torch.softmax(teacher.double(), -1)
    kl = (p * (p.log() - torch.log_softmax(student.double(), -1))).sum(-1)
    expected = kl[mask].mean()
    torch.testing.assert_close(distillation_loss(student, teacher, mask).double(), expected)
    assert distillation_loss(teacher, teacher, mask) == 0  # exactly, not approximately
    with pytest.raises(ValueError, match="same vocabulary"):
        distillation_loss(student, teacher[..., :10], mask)
    ids = torch.ones(2, 4, dtype=torch.long)
    attention = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert next_token_mask(attention, ids).tolist() == [[1, 1, 0], [1, 1, 1]]


def _config(model_dir, math_file, out, **extra):
    from qdiablo.train import TrainConfig

    return TrainConfig(
        model=str(model_dir),
        base="fp",
        num_blocks=8,
        data=[str(math_file)],
        max_length=256,
        batch_size=4,
        micro_batch_size=2,
        max_steps=4,
        lr=2e-2,
        warmup=0,
        save_steps=0,
        logging_steps=1,
        progress=False,
        output=str(out),
        **extra,
    )


def _losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_distilling_from_the_model_itself_starts_at_zero(tiny_model_dir, math_file, tmp_path):
    from qdiablo.train import train

    # The student is the teacher plus zero-initialised DiaBlo blocks: the same logits, KL 0.
    run = train(_config(tiny_model_dir, math_file, tmp_path / "kl", distill=str(tiny_model_dir)))
    assert run.results["distill"] == str(tiny_model_dir)
    assert _losses(tmp_path / "kl")[0] == 0.0
    # Half and half: the first loss is half the LM loss of the same first batch.
    lm = train(_config(tiny_model_dir, math_file, tmp_path / "lm"))
    mixed = train(
        _config(
            tiny_model_dir, math_file, tmp_path / "mix", distill=str(tiny_model_dir),
            distill_weight=0.5,
        )
    )  # fmt: skip
    first_lm = _losses(tmp_path / "lm")[0]
    assert _losses(tmp_path / "mix")[0] == pytest.approx(0.5 * first_lm, rel=1e-5)
    assert lm.results["distill"] is None and mixed.results["global_step"] == 4


def test_distillation_pulls_a_perturbed_student_to_its_teacher(tiny_model_dir, math_file, tmp_path):
    """A teacher that differs from the student: the KL falls as the blocks train."""
    from conftest import make_tiny_llama, make_tokenizer

    from qdiablo.train import train

    teacher = tmp_path / "teacher"
    make_tiny_llama(seed=0, init_range=0.03).save_pretrained(teacher)
    make_tokenizer().save_pretrained(teacher)
    out = tmp_path / "run"
    config = _config(tiny_model_dir, math_file, out, distill=str(teacher))
    config.max_steps = 12
    train(config)
    losses = _losses(out)
    assert losses[0] > 0 and min(losses[-3:]) < 0.8 * losses[0]


def test_distill_refusals(tiny_model_dir, math_file, tmp_path, monkeypatch):
    from conftest import make_tiny_llama, make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from qdiablo.train import train

    other = tmp_path / "other-vocab"
    config = make_tiny_llama(seed=0).config.to_dict()
    config["vocab_size"] += 8
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    with pytest.raises(UserError, match="vocabulary"):
        train(_config(tiny_model_dir, math_file, tmp_path / "v", distill=str(other)))
    with pytest.raises(UserError, match="--distill-weight"):
        _config(tiny_model_dir, math_file, tmp_path / "w", distill="x", distill_weight=1.5)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(UserError, match="--distill is not supported under FSDP"):
        train(_config(tiny_model_dir, math_file, tmp_path / "f", distill=str(tiny_model_dir)))
