"""save_quantized / load_quantized: the GPTQ folder layout, bit-identical round trips in both
zero-point conventions, and strict, named errors for broken folders."""

import dataclasses
import json

import pytest
import torch
from conftest import make_tiny_llama, make_tokenizer
from safetensors import safe_open
from safetensors.torch import save_file

from quantizers import (
    CheckpointError,
    QuantConfig,
    load_quantized,
    quantize_model,
    save_quantized,
    tokenize_calibration,
)
from quantizers.packing import unpack_qzeros

TEXT = "Weng earns $12 an hour for babysitting. Yesterday, she did 50 minutes of babysitting. "


def quantized_tiny(config: QuantConfig, **model_kw):
    calib = tokenize_calibration(make_tokenizer(), [TEXT * 8] * 8, 8, 64, 4)
    return quantize_model(make_tiny_llama(**model_kw), calib, config), calib[0]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, ids = quantized_tiny(QuantConfig(bits=3, group_size=32, checkpoint_format="gptq"))
    path = tmp_path_factory.mktemp("ckpt") / "w3"
    save_quantized(model, path, make_tokenizer())
    return model, ids, path


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_round_trip_is_bit_identical(tmp_path, fmt):
    model, ids = quantized_tiny(
        QuantConfig(bits=4, group_size=32, sym=False, checkpoint_format=fmt)
    )
    save_quantized(model, tmp_path / "q", make_tokenizer())
    loaded = load_quantized(tmp_path / "q")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert torch.equal(logits(model, ids), logits(loaded, ids))
    assert loaded.quant_config == model.quant_config


def test_folder_layout_and_zero_point_convention(saved):
    model, _, path = saved
    names = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "quantize_config.json",
        "model.safetensors",
        "tokenizer.json",
        "quantization_report.json",
        "quantization_report.md",
    } <= names
    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc == json.loads((path / "quantize_config.json").read_text())
    assert (qc["quant_method"], qc["checkpoint_format"], qc["bits"], qc["group_size"]) == (
        "gptq",
        "gptq",
        3,
        32,
    )
    assert qc["meta"]["qdiablo"]["method"] == "gptq"
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        stored = f.get_tensor("model.layers.0.mlp.down_proj.qzeros")
        assert f.get_tensor("model.layers.0.mlp.down_proj.qweight").shape == (128 * 3 // 32, 64)
        assert f.get_tensor("model.layers.0.mlp.down_proj.scales").dtype == torch.float16
        assert f.get_tensor("model.layers.0.mlp.down_proj.g_idx").dtype == torch.int32
    assert "model.layers.0.mlp.down_proj.weight" not in keys
    layer = model.model.layers[0].mlp.down_proj
    # v1 ("gptq") stores zero - 1; the quantizer kept every zero >= 1 so nothing wrapped
    assert int(layer.zeros().min()) >= 1
    assert torch.equal(unpack_qzeros(stored, 3, 64), layer.zeros() - 1)


def test_v2_stores_zero_points_as_is(tmp_path):
    model, _ = quantized_tiny(QuantConfig(bits=2, group_size=32, checkpoint_format="gptq_v2"))
    save_quantized(model, tmp_path / "q")
    layer = model.model.layers[1].self_attn.o_proj
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        stored = f.get_tensor("model.layers.1.self_attn.o_proj.qzeros")
    assert torch.equal(stored, layer.packed_tensors().qzeros)


def test_v1_cannot_hold_a_zero_point_of_zero(tmp_path):
    model, _ = quantized_tiny(QuantConfig(bits=2, group_size=32, checkpoint_format="gptq_v2"))
    layer = model.model.layers[0].self_attn.q_proj
    from quantizers.packing import pack_qzeros

    zeros = layer.zeros()
    zeros[0, 0] = 0
    layer.packed_tensors().qzeros.copy_(pack_qzeros(zeros, 2))
    model.quant_config = dataclasses.replace(model.quant_config, checkpoint_format="gptq")
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj: 1 zero points are 0"):
        save_quantized(model, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind


def test_bias_and_tied_embeddings_round_trip(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=261,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    calib = tokenize_calibration(make_tokenizer(), [TEXT * 8] * 8, 8, 64, 4)
    quantize_model(model, calib, QuantConfig(bits=4, group_size=32))
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    save_quantized(model, tmp_path / "q")
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # tied: stored once
    loaded = load_quantized(tmp_path / "q")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(model, calib[0]), logits(loaded, calib[0]))


def test_save_replaces_only_its_own_files_and_stages_atomically(saved, tmp_path):
    model, _, _ = saved
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("the user's")
    (target / "model.safetensors").write_bytes(b"an older save")
    save_quantized(model, target)
    assert (target / "notes.txt").read_text() == "the user's"  # never deleted
    assert (target / "model.safetensors").stat().st_size > 100  # replaced
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    class Broken:
        def save_pretrained(self, _path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, target, tokenizer=Broken())
    after = {p.name: p.read_bytes() for p in target.iterdir()}
    assert after == before  # the failed save left the folder byte-identical, no staging left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_truncated_file_names_file_and_tensor(saved, tmp_path):
    _, _, path = saved
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in path.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.+' is truncated"):
        load_quantized(broken)
    (broken / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="no safetensors header"):
        load_quantized(broken)
    (broken / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="truncated: the header alone needs"):
        load_quantized(broken)
    (broken / "model.safetensors").write_bytes(data[:8] + b"{garbage" + data[16:])
    with pytest.raises(CheckpointError, match="malformed safetensors header"):
        load_quantized(broken)


def _copy_with(path, tmp_path, edit):
    target = tmp_path / "edited"
    target.mkdir(parents=True)
    for p in path.iterdir():
        (target / p.name).write_bytes(p.read_bytes())
    with safe_open(target / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in list(f.keys())}
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_missing_extra_and_mismatched_tensors_are_named(saved, tmp_path):
    _, _, path = saved
    key = "model.layers.1.mlp.up_proj.qweight"
    target = _copy_with(path, tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=f"tensor '{key}' is missing"):
        load_quantized(target)


def test_extra_tensor_is_named(saved, tmp_path):
    _, _, path = saved
    target = _copy_with(path, tmp_path, lambda t: t.update({"model.extra.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.extra\.weight'"):
        load_quantized(target)


def test_bits_mismatch_is_named(saved, tmp_path):
    _, _, path = saved
    target = _copy_with(path, tmp_path, lambda t: None)
    for name in ("config.json", "quantize_config.json"):
        data = json.loads((target / name).read_text())
        qc = data["quantization_config"] if name == "config.json" else data
        qc["bits"] = 4
        qc["meta"]["qdiablo"]["bits"] = 4
        (target / name).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\..*qweight' has shape"):
        load_quantized(target)


def test_disagreeing_config_files_are_an_error(saved, tmp_path):
    _, _, path = saved
    target = _copy_with(path, tmp_path, lambda t: None)
    data = json.loads((target / "quantize_config.json").read_text())
    data["group_size"] = 64
    (target / "quantize_config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"quantize_config\.json: group_size=64 disagrees"):
        load_quantized(target)
    (target / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: malformed JSON"):
        load_quantized(target)


def _edit_both_configs(target, edit) -> None:
    for name in ("config.json", "quantize_config.json"):
        data = json.loads((target / name).read_text())
        edit(data["quantization_config"] if name == "config.json" else data)
        (target / name).write_text(json.dumps(data))


@pytest.mark.parametrize(("key", "value"), [("bits", 4), ("group_size", 64), ("sym", True)])
def test_top_level_keys_must_agree_with_qdiablo_metadata(saved, tmp_path, key, value):
    """GPTQModel reads the top-level keys, qdiablo its meta: a folder where they differ would
    load as two different models, so it loads as neither."""
    _, _, path = saved
    target = _copy_with(path, tmp_path, lambda t: None)
    _edit_both_configs(target, lambda qc: qc.__setitem__(key, value))
    ours = json.loads((path / "quantize_config.json").read_text())["meta"]["qdiablo"][key]
    match = rf"top-level {key}={value!r} disagrees with qdiablo's meta\.qdiablo\.{key}={ours!r}"
    with pytest.raises(CheckpointError, match=match):
        load_quantized(target)


def test_a_newer_format_says_so(saved, tmp_path):
    _, _, path = saved
    assert (
        json.loads((path / "quantize_config.json").read_text())["meta"]["qdiablo_format_version"]
        == 1
    )
    target = _copy_with(path, tmp_path, lambda t: None)

    def newer(qc):
        qc["meta"]["qdiablo_format_version"] = 2
        qc["meta"]["qdiablo"]["a_field_from_the_future"] = 1

    _edit_both_configs(target, newer)
    with pytest.raises(CheckpointError, match=r"written by a newer qdiablo .*format 2"):
        load_quantized(target)


def test_out_of_range_g_idx_and_bad_scales_are_refused(saved, tmp_path):
    _, _, path = saved
    layer = "model.layers.0.self_attn.q_proj"

    def crafted_g_idx(t):
        t[f"{layer}.g_idx"] = t[f"{layer}.g_idx"].clone()
        t[f"{layer}.g_idx"][5] = 10_000  # a kernel would read scales[10000]

    target = _copy_with(path, tmp_path / "g", crafted_g_idx)
    with pytest.raises(
        CheckpointError, match=rf"'{layer}\.g_idx' holds values 0\.\.10000, outside"
    ):
        load_quantized(target)
    for bad in (0.0, float("inf"), float("nan")):

        def crafted_scale(t, bad=bad):
            t[f"{layer}.scales"] = t[f"{layer}.scales"].clone()
            t[f"{layer}.scales"][1, 3] = bad

        target = _copy_with(path, tmp_path / str(bad), crafted_scale)
        with pytest.raises(CheckpointError, match=rf"'{layer}\.scales' holds 1 zero or non-finite"):
            load_quantized(target)


def test_foreign_weights_files_are_refused(saved, tmp_path):
    _, _, path = saved
    target = _copy_with(path, tmp_path, lambda t: None)
    save_file({"x": torch.ones(2)}, target / "model-00001-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=r"does not list \(model-00001-of-00002"):
        load_quantized(target)
    (target / "model-00001-of-00002.safetensors").unlink()
    (target / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(CheckpointError, match=r"does not list \(model\.safetensors\.index\.json"):
        load_quantized(target)
