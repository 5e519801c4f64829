"""`qdiablo export --merged / --requantize` work one decoder block at a time.

References are computed independently, the way the export did it before it streamed: the whole
model merged in memory (DiaBlo's merge_and_unload, packed layers dequantized) and re-quantized
by `quantize_model` in one piece. The streamed export must write the same tensors, bit for bit,
and split merged/ into shards (with an index) that transformers loads as one model.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama, make_tokenizer
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from qdiablo.adapters.loading import load_adapter
from qdiablo.calibration import build_calibration_data
from qdiablo.diablo import DiaBloConfig, get_diablo_model
from qdiablo.export import export_model, verify_export
from quantizers import QuantConfig, QuantLinear, load_quantized, quantize_model, save_quantized
from quantizers.calibration import find_decoder_blocks
from quantizers.lazy import streamed_logits

TEXT = "Natalia sold clips to 48 of her friends in April, and half as many clips in May.\n\n"


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A 3-block RTN base (tied head) and a DiaBlo adapter with random (trained-like) blocks."""
    root = tmp_path_factory.mktemp("stream-export")
    tokenizer = make_tokenizer()
    torch.manual_seed(5)
    config = make_tiny_llama(layers=3).config
    config.tie_word_embeddings = True
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_quantized(
        quantize_model(model, None, QuantConfig(method="rtn", bits=4, group_size=32)),
        root / "base",
        tokenizer,
    )
    adapted = get_diablo_model(load_quantized(root / "base"), DiaBloConfig(num_blocks=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for _, layer in adapted.diablo_layers():
            layer.blocks.normal_(0, 0.02)
    adapted.save_pretrained(root / "adapter")
    (root / "calib.txt").write_text(TEXT * 30)
    return root


def dense_reference(root, dtype=torch.float32):
    """The whole model merged in memory: W_deq + Dᵀ for adapted layers, W_deq for the others."""
    model = load_adapter(load_quantized(root / "base"), root / "adapter").merge_and_unload(dtype)
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = m.dequantize_weight(torch.float32).to(dtype)
            model.set_submodule(name, lin)
    for p in model.parameters():  # parameters only: rotary tables stay float32, as on loading
        p.data = p.data.to(dtype)
    return model.eval()


def test_merged_shards_hold_the_whole_model_merged(packed, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr("qdiablo.export.merge.SHARD_BYTES", 60_000)  # several shards
    out = export_model(packed / "base", packed / "adapter", tmp_path / "e", merged=True)
    shards = sorted(p.name for p in (out / "merged").glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "merged/model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert verify_export(out)  # the manifest lists every shard
    stored = {}
    for name in shards:
        part = load_file(out / "merged" / name)
        assert sum(t.numel() * t.element_size() for t in part.values()) <= 60_000 or len(part) == 1
        stored.update(part)
    ref = dense_reference(packed, torch.float16)
    want = ref.state_dict()
    assert "lm_head.weight" not in stored  # tied: stored once, as the embedding
    assert set(stored) == set(want) - {"lm_head.weight"}
    for key, t in stored.items():
        assert t.dtype == torch.float16 and torch.equal(t, want[key]), key
    loaded = AutoModelForCausalLM.from_pretrained(out / "merged")
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref(ids).logits)


def test_requantize_matches_the_whole_model_requantized(packed, tmp_path):
    calib_kw = {"calib_samples": 4, "calib_seq_len": 32, "calib_batch_size": 8}
    out = export_model(
        packed / "base",
        packed / "adapter",
        tmp_path / "e",
        requantize_merged=True,
        calib=packed / "calib.txt",
        quant_overrides={"method": "gptq", "bits": 3},
        **calib_kw,
    )
    dense = dense_reference(packed)
    calib = build_calibration_data(make_tokenizer(), packed / "calib.txt", 4, 32, 8)
    config = QuantConfig(method="gptq", bits=3, group_size=32)
    save_quantized(quantize_model(dense, calib, config), tmp_path / "ref")
    got = load_file(out / "merged-gptq/model.safetensors")
    want = load_file(tmp_path / "ref/model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    card = (out / "README.md").read_text()
    assert "logits moved by max" in card


def test_streamed_logits_equal_the_whole_forward(packed):
    whole = dense_reference(packed)
    _, blocks = find_decoder_blocks(whole)
    kept = list(blocks)
    ids = torch.tensor([[1, 72, 101, 108, 108, 111], [1, 60, 61, 62, 63, 64]])
    loads = []

    def load(i, device):
        loads.append(i)
        return kept[i]

    with torch.no_grad():
        want = whole(input_ids=ids).logits
    got = streamed_logits(whole, load, ids)
    assert loads == [0, 1, 2]
    assert torch.equal(got, want)
    assert list(blocks) == kept  # the blocks are back in place
