"""`train()` end to end on a tiny LLaMA with HF Trainer: outputs, adapter-only checkpoints,
bit-identical resume, gradient checkpointing and accumulation, precision, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from qdiablo import DiaBloModel
from qdiablo.adapters.budget import (
    diablo_parameters,
    lora_parameters,
    matched_num_blocks,
    matched_rank,
)
from qdiablo.errors import UserError
from qdiablo.train import TrainConfig, train
from qdiablo.train.bases import load_training_base


def config(tmp_path, model_dir, data, name="run", **overrides) -> TrainConfig:
    settings = dict(
        model=str(model_dir),
        data=[str(data)] if data else None,
        decontaminate=["none"],
        num_blocks=8,
        rank=4,
        batch_size=4,
        max_steps=4,
        save_steps=0,
        logging_steps=1,
        max_length=256,
        progress=False,
        seed=1,
        output=str(tmp_path / name),
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


class StopAt(TrainerCallback):
    """Interrupts a run after `step` (after that step's checkpoint is written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_diablo_on_nf4_trains_and_saves_a_loadable_adapter(tmp_path, tiny_model_dir, math_file):
    cfg = config(tmp_path, tiny_model_dir, math_file, base="nf4", max_steps=8, lr=2e-2, warmup=0)
    result = train(cfg)
    res = json.loads((result.output / "train_results.json").read_text())
    shapes = [(64, 64), (64, 32), (64, 32), (64, 128), (128, 64)] * 2
    assert res["trainable_parameters"] == diablo_parameters(shapes, 8)
    r = matched_rank(shapes, 8)
    assert res["other_method"] == {
        "adapter": "lora",
        "rank": r,
        "trainable_parameters": lora_parameters(shapes, r),
    }
    assert r * 2 * 704 == lora_parameters(shapes, r)  # Σ(in+out) = 704 per decoder layer
    assert res["budget"]["rank"] == 4 and res["global_step"] == 8
    assert res["last_logged_loss"] < res["first_logged_loss"] - 0.05
    assert res["throughput"]["tokens_per_second"] > 0 and res["throughput"]["peak_rss_bytes"] > 0
    assert res["data"]["examples"] == 40 and res["data"]["dropped"] == 0
    assert json.loads((result.output / "train_config.json").read_text())["base"] == "nf4"
    assert len((result.output / "log.jsonl").read_text().splitlines()) >= 8
    # the saved adapter, loaded strictly onto a freshly quantized base, gives the same model
    fresh = DiaBloModel.from_pretrained(
        load_training_base("nf4", str(tiny_model_dir)).model, result.adapter_dir
    )
    ids = torch.randint(0, 250, (2, 16))
    result.model.eval()
    with torch.no_grad():  # from_pretrained returns the model in eval mode (no dropout)
        torch.testing.assert_close(fresh(input_ids=ids).logits, result.model(input_ids=ids).logits)


@pytest.mark.parametrize("adapter", ["diablo", "lora"])
def test_checkpoints_hold_the_adapter_only(tmp_path, tiny_model_dir, math_file, adapter):
    cfg = config(tmp_path, tiny_model_dir, math_file, adapter=adapter, save_steps=2)
    result = train(cfg)
    ckpt = result.output / "checkpoints" / "checkpoint-2"
    files = {p.name for p in ckpt.iterdir()}
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= files
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    tensors = adapter_tensors(ckpt)
    marker = ".blocks" if adapter == "diablo" else ".lora_"
    assert all(marker in k for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == result.results["trainable_parameters"]
    weights_bytes = (ckpt / "adapter_model.safetensors").stat().st_size
    assert weights_bytes < 4 * result.results["trainable_parameters"] + 64 * 1024


@pytest.mark.parametrize(
    ("adapter", "base", "records", "stop"),
    [("diablo", "fp", None, 3), ("lora", "fp", None, 3), ("diablo", "nf4", 12, 4)],
    ids=["diablo", "lora", "diablo-nf4-across-epochs"],
)
def test_resume_is_bit_identical_to_an_uninterrupted_run(
    tmp_path, tiny_model_dir, math_file, adapter, base, records, stop
):
    common = dict(
        adapter=adapter,
        base=base,
        max_records=records,  # 12 records: 3 steps per epoch, so the stop is in epoch 2
        max_steps=6,
        save_steps=stop,
        batch_size=4,
        micro_batch_size=2,  # gradient accumulation across the interruption too
        dropout=0.1,
        warmup=2,
        lr=1e-2,
    )
    full = train(config(tmp_path, tiny_model_dir, math_file, name="full", **common))
    interrupted = config(tmp_path, tiny_model_dir, math_file, name="cut", **common)
    partial = train(interrupted, callbacks=[StopAt(stop)])
    assert partial.results["global_step"] == stop
    halfway = adapter_tensors(partial.adapter_dir)
    assert not all(torch.equal(t, adapter_tensors(full.adapter_dir)[k]) for k, t in halfway.items())
    resumed = train(
        config(tmp_path, tiny_model_dir, math_file, name="cut", resume="auto", **common)
    )
    assert resumed.results["resumed_from"].endswith(f"checkpoint-{stop}")
    assert resumed.results["global_step"] == 6
    a, b = adapter_tensors(full.adapter_dir), adapter_tensors(resumed.adapter_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_gradient_checkpointing_trains_identically(tmp_path, tiny_model_dir, math_file):
    common = dict(base="nf4", max_steps=3, dropout=0.05, lr=1e-2)
    plain = train(config(tmp_path, tiny_model_dir, math_file, name="plain", **common))
    ckpt = train(
        config(
            tmp_path, tiny_model_dir, math_file, name="gc", gradient_checkpointing=True, **common
        )
    )
    assert ckpt.model.get_base_model().is_activation_checkpointing
    a, b = adapter_tensors(plain.adapter_dir), adapter_tensors(ckpt.adapter_dir)
    assert any(t.abs().sum() > 0 for t in a.values())
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-7, rtol=1e-5, msg=key)


def test_gradient_accumulation_matches_the_full_batch(tmp_path, tiny_model_dir, math_file):
    common = dict(max_steps=3, dropout=0.0, lr=1e-2, batch_size=4)
    whole = train(
        config(tmp_path, tiny_model_dir, math_file, name="b4", micro_batch_size=4, **common)
    )
    accumulated = train(
        config(tmp_path, tiny_model_dir, math_file, name="b1x4", micro_batch_size=1, **common)
    )
    assert accumulated.results["gradient_accumulation_steps"] == 4
    a, b = adapter_tensors(whole.adapter_dir), adapter_tensors(accumulated.adapter_dir)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-4, msg=key)


def test_lora_at_matched_budget_records_both_counts(tmp_path, tiny_model_dir, math_file):
    cfg = config(tmp_path, tiny_model_dir, math_file, adapter="lora", rank=None, match_params=True)
    result = train(cfg)
    shapes = [(64, 64), (64, 32), (64, 32), (64, 128), (128, 64)] * 2
    rank = matched_rank(shapes, 8)
    assert result.results["budget"]["rank"] == rank
    assert result.results["trainable_parameters"] == lora_parameters(shapes, rank)
    other = result.results["other_method"]
    assert other["num_blocks"] == matched_num_blocks(shapes, rank)
    assert other["trainable_parameters"] == diablo_parameters(shapes, other["num_blocks"])
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["r"] == rank and saved["lora_alpha"] == 2 * rank


@pytest.mark.parametrize("adapter", ["diablo", "lora"])
def test_sixteen_bit_base_trains_float32_adapters(tmp_path, tiny_model_dir, math_file, adapter):
    cfg = config(
        tmp_path, tiny_model_dir, math_file, adapter=adapter, dtype="bfloat16", precision="bf16"
    )
    result = train(cfg)
    model = result.model
    assert model.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight.dtype == (
        torch.bfloat16
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(torch.isfinite(t).all() for t in adapter_tensors(result.adapter_dir).values())
    assert any(t.abs().sum() > 0 for t in adapter_tensors(result.adapter_dir).values())


def test_nf2_lora_baseline_trains(tmp_path, tiny_model_dir, math_file):
    cfg = config(
        tmp_path, tiny_model_dir, math_file, base="nf2", adapter="lora", lr=2e-2, max_steps=6
    )
    result = train(cfg)
    assert "NF2" in result.results["base_description"]
    assert result.results["last_logged_loss"] < result.results["first_logged_loss"] - 0.05


def test_default_data_is_decontaminated_and_the_count_printed(tmp_path, tiny_model_dir, capsys):
    cfg = config(
        tmp_path,
        tiny_model_dir,
        None,
        decontaminate=["gsm8k", "mawps"],
        max_records=8,
        max_steps=1,
        max_length=512,
    )
    result = train(cfg)
    data = result.results["data"]
    assert data["records"] == 1824 and data["dropped"] == sum(data["dropped_per_set"].values())
    assert data["dropped_per_set"]["mawps"] > 0 and data["examples"] <= 8
    assert f"decontamination: dropped {data['dropped']} of 1824" in capsys.readouterr().out


def test_run_errors_are_clear(tmp_path, tiny_model_dir, math_file):
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        train(config(tmp_path, tiny_model_dir, math_file, name="fp16", precision="fp16"))
    train(config(tmp_path, tiny_model_dir, math_file, name="used", max_steps=1, save_steps=1))
    with pytest.raises(UserError, match="already holds a training run"):
        train(config(tmp_path, tiny_model_dir, math_file, name="used", max_steps=1))
    with pytest.raises(UserError, match=r"other settings.*num_blocks: 8 → 16"):
        train(
            config(tmp_path, tiny_model_dir, math_file, name="used", num_blocks=16, resume="auto")
        )
    with pytest.raises(UserError, match="no complete checkpoint"):
        train(config(tmp_path, tiny_model_dir, math_file, name="fresh", resume="auto"))
    with pytest.raises(UserError, match="not a multiple of --micro-batch-size 3"):
        train(config(tmp_path, tiny_model_dir, math_file, name="mb", micro_batch_size=3))
    with pytest.raises(UserError, match="does not divide"):
        train(config(tmp_path, tiny_model_dir, math_file, name="n", num_blocks=64))
