"""Serving exports: the GGUF for llama.cpp (exact 4-bit blocks, read back with gguf's own
dequantizer and loaded by transformers) and marlin/ for vLLM/SGLang (its config checked against
the engines' own rules, re-implemented here from their source).

A tiny LLaMA with a byte-level BPE tokenizer that has merges (llama.cpp needs them; the shared
test tokenizer has none) is quantized, trained for a few DiaBlo steps and exported once per
module. (Over 400 lines: the engines' rules and the GGUF reference readers are stated here, apart
from the code under test.)"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from conftest import CHAT_TEMPLATE, make_tiny_llama
from safetensors import safe_open

from qdiablo import cli
from qdiablo.errors import UserError
from qdiablo.export import export_model, verify_export
from qdiablo.export.gguf import plan_gguf, write_gguf
from qdiablo.export.serving import ServeOptions
from quantizers import QuantConfig, QuantLinear, load_quantized, quantize_model, save_quantized
from quantizers.calibration import tokenize_calibration

TEXT = "The cat and the hat sat in the sun; then 12 and 30 made 42.\n\n"
IDS = torch.tensor([[1, 44, 73, 80, 80, 83, 263, 267, 16, 225, 22], [1, *range(60, 70)]])
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("Ġa", "n"), ("Ġan", "d")]


def make_bpe_tokenizer():
    """A real byte-level BPE tokenizer with a few merges: 5 specials, 256 bytes, 7 merged."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(specials + alphabet + ["".join(m) for m in MERGES])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


VOCAB = 5 + 256 + len(MERGES)


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _quantized(config: QuantConfig, seed: int = 0):
    tok = make_bpe_tokenizer()
    model = make_tiny_llama(seed=seed, vocab=VOCAB)
    calib = tokenize_calibration(tok, [TEXT * 20], num_samples=4, seq_len=32)
    return quantize_model(model, calib if config.method == "gptq" else None, config), tok


def _read_gguf(path):
    """{name: (dequantized float32 array [rows, cols], GGML type name)} via gguf's own reader and
    dequantizer, plus the metadata fields."""
    reader = gguf.GGUFReader(str(path))
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = (np.asarray(data, dtype=np.float32), t.tensor_type.name)
    return tensors, reader.fields


def _unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary row order back to HF's, written as a loop: GGUF row h·d + 2i + j is HF
    row h·d + j·d/2 + i (an independent statement of the permutation the export applies)."""
    d = rows.shape[0] // heads
    out = np.empty_like(rows)
    for h in range(heads):
        for i in range(d // 2):
            for j in range(2):
                out[h * d + j * (d // 2) + i] = rows[h * d + 2 * i + j]
    return out


LAYERS = (
    ("self_attn.q_proj", "attn_q", "num_attention_heads"),
    ("self_attn.k_proj", "attn_k", "num_key_value_heads"),
    ("self_attn.v_proj", "attn_v", None),
    ("self_attn.o_proj", "attn_output", None),
    ("mlp.gate_proj", "ffn_gate", None),
    ("mlp.up_proj", "ffn_up", None),
    ("mlp.down_proj", "ffn_down", None),
)


def assert_blocks_match(tensors, model, qtype: str) -> float:
    """Every quantized layer of the GGUF, dequantized by gguf, against qdiablo's dequantized
    weight s·(q − z); returns the largest fp16 rounding of m met."""
    worst = 0.0
    for i, block in enumerate(model.model.layers):
        for hf, name, heads in LAYERS:
            q = block.get_submodule(hf)
            got, kind = tensors[f"blk.{i}.{name}.weight"]
            assert kind == qtype, hf
            if heads:
                got = _unpermute(got, getattr(model.config, heads))
            want = q.dequantize_weight(torch.float32).numpy()  # s·(q − z), exact in float32
            if qtype == "Q4_0":  # d·(q − 8) is the same product, bit for bit
                assert np.array_equal(got, want), hf
                continue
            # Q4_1: d·q + m with m = fp16(−s·z). Where −s·z is an fp16 number the sum is the
            # exactly representable s·(q − z): bit for bit. Elsewhere the difference is m's
            # rounding (plus float32's rounding of the sum, half an ulp).
            g = q.packed_tensors().g_idx.long()
            s = q.packed_tensors().scales.float().t()[:, g]
            m = -(s * q.zeros().float().t()[:, g])
            dm = (m.half().float() - m).abs().numpy()
            exact = dm == 0
            assert exact.any() and np.array_equal(got[exact], want[exact]), hf
            assert (np.abs(got - want) <= dm + np.spacing(np.abs(got)) / 2).all(), hf
            worst = max(worst, float(dm.max()))
    return worst


def with_gguf_weights(model, tensors):
    """A float copy of `model` holding the GGUF's own weights (gguf's dequantizer; q/k rows put
    back in HF's order): what transformers must compute from the file, up to float32 rounding."""
    import copy

    out = copy.deepcopy(model).float()
    for i, block in enumerate(out.model.layers):
        for hf, name, heads in LAYERS:
            w = tensors[f"blk.{i}.{name}.weight"][0]
            if heads:
                w = _unpermute(w, getattr(model.config, heads))
            block.set_submodule(hf, torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
            block.get_submodule(hf).weight.data = torch.from_numpy(w.copy())
    out.model.embed_tokens.weight.data = torch.from_numpy(tensors["token_embd.weight"][0].copy())
    if "output.weight" in tensors:
        out.lm_head.weight.data = torch.from_numpy(tensors["output.weight"][0].copy())
    return out.eval()


@pytest.mark.parametrize(
    ("group", "sym", "qtype"), [(32, False, "Q4_1"), (64, False, "Q4_1"), (-1, True, "Q4_0")]
)
def test_gguf_blocks_read_back_as_qdiablo_weights(tmp_path, group, sym, qtype):
    model, tok = _quantized(QuantConfig(bits=4, group_size=group, sym=sym, magr=True, magr_iters=3))
    shapes = {
        n: (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear)
    }
    plan = plan_gguf("auto", model.quant_config, shapes)
    assert (plan.qtype, plan.exact) == (qtype, True)
    stats = write_gguf(model, tmp_path / plan.file_name, tok, plan, "tiny")
    tensors, _ = _read_gguf(tmp_path / plan.file_name)
    worst = assert_blocks_match(tensors, model, qtype)
    assert stats.max_abs_m_rounding == pytest.approx(worst)
    # the rest as llama.cpp's converter writes it: norms F32, embeddings and head F16
    assert tensors["token_embd.weight"][1] == "F16" and tensors["output.weight"][1] == "F16"
    assert tensors["blk.0.attn_norm.weight"][1] == "F32"
    head = model.lm_head.weight.detach().half().float().numpy()
    assert np.array_equal(tensors["output.weight"][0], head)


def test_transformers_loads_the_gguf_with_its_tokenizer_and_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = _quantized(QuantConfig(bits=4, group_size=32, magr=True, magr_iters=3))
    plan = plan_gguf("auto", model.quant_config, {})
    write_gguf(model, tmp_path / plan.file_name, tok, plan, "tiny")
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=plan.file_name, dtype=torch.float32
    )
    want, got = _logits(model), _logits(loaded)
    exact = _logits(with_gguf_weights(model, _read_gguf(tmp_path / plan.file_name)[0]))
    assert (got - exact).abs().max() < 1e-5 * want.abs().max()  # the file's own weights
    # fp16 noise: the F16 embeddings and head, and the fp16 m of the Q4_1 blocks (measured
    # 7e-4 of the largest logit; q/k rows left in HF's rotary order give 1.2e-2)
    assert (got - want).abs().max() < 2e-3 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    gtok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=plan.file_name)
    for text in (TEXT, "<|im_start|>user\n  the and in<|im_end|>", "12+30=42"):
        assert gtok(text).input_ids == tok(text).input_ids, text
    assert gtok.chat_template == CHAT_TEMPLATE
    assert (gtok.bos_token, gtok.eos_token) == ("<s>", "</s>")


# --- The engines' rules for turning a GPTQ folder into Marlin, re-implemented from their source
# (read there, not copied):
# vLLM, vllm/model_executor/layers/quantization/gptq_marlin.py, GPTQMarlinConfig:
#   TYPE_MAP = {(4, True): uint4b8, (8, True): uint8b128}. is_gptq_marlin_compatible(cfg): the
#   quant_method, lowercased, is "gptq"; bits, group_size, sym and desc_act are all present;
#   (bits, sym) is in TYPE_MAP; and check_marlin_supported(type, group_size)
#   (vllm/model_executor/layers/quantization/utils/marlin_utils.py): the type is one the device
#   supports (uint4b8 and uint8b128 on CUDA capability >= 75, uint4b8 only on vLLM's CPU backend)
#   and group_size is in MARLIN_SUPPORTED_GROUP_SIZES = [-1, 32, 64, 128]. from_config reads
#   bits, group_size, desc_act and sym with get_from_keys (a missing key raises).
# SGLang, python/sglang/srt/layers/quantization/gptq.py, GPTQMarlinConfig.
#   override_quantization_method(cfg): converts when not check_marlin_format(cfg)
#   (checkpoint_format == "marlin" or is_marlin_format: an already repacked file) and
#   is_gptq_marlin_compatible(cfg), the same rules with CUDA capability >= 80
#   (python/sglang/srt/layers/quantization/marlin_utils.py).
# Both, GPTQMarlinLinearMethod.create_weights: each layer's tensors are allocated as qweight
#   int32 [in // (32 // bits), out], scales [in // group, out], qzeros int32
#   [in // group, out // (32 // bits)], g_idx int32 [in] (group = in for -1), and the checkpoint
#   must fill them; Marlin's kernels read a symmetric code q as q − 2^(bits−1) and no zeros.
MARLIN_TYPES = {(4, True): "uint4b8", (8, True): "uint8b128"}
MARLIN_GROUPS = (-1, 32, 64, 128)


def vllm_converts_to_marlin(cfg: dict, backend: str = "cuda") -> bool:
    supported = {"cuda": ("uint4b8", "uint8b128"), "cpu": ("uint4b8",)}[backend]
    if str(cfg.get("quant_method", "")).lower() != "gptq":
        return False
    if any(cfg.get(k) is None for k in ("bits", "group_size", "sym", "desc_act")):
        return False
    qtype = MARLIN_TYPES.get((cfg["bits"], cfg["sym"]))
    return qtype in supported and cfg["group_size"] in MARLIN_GROUPS


def sglang_converts_to_marlin(cfg: dict) -> bool:
    repacked = cfg.get("checkpoint_format") == "marlin" or cfg.get("is_marlin_format", False)
    return not repacked and vllm_converts_to_marlin(cfg, "cuda")


def engine_shapes(k: int, n: int, bits: int, group: int) -> dict[str, tuple[tuple[int, ...], str]]:
    groups = k // (k if group == -1 else group)
    return {
        "qweight": ((k // (32 // bits), n), "I32"),
        "scales": ((groups, n), "F16"),
        "qzeros": ((groups, n // (32 // bits)), "I32"),
        "g_idx": ((k,), "I32"),
    }


def _unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [in, out] from the GPTQ qweight, one value at a time: value j of each int32 word is
    bits [j·bits, (j+1)·bits)."""
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    per = 32 // bits
    rows = [(words >> (j * bits)) & (2**bits - 1) for j in range(per)]
    return torch.stack(rows, dim=1).reshape(-1, qweight.shape[1])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, math_file):
    """A MagR+GPTQ W4 g32 asymmetric base (BPE tokenizer), a few DiaBlo steps, and one export
    with --requantize, --gguf and --serve marlin through the CLI."""
    from qdiablo.train import TrainConfig, train

    root = tmp_path_factory.mktemp("serving")
    tok = make_bpe_tokenizer()
    calib = tokenize_calibration(tok, [TEXT * 20], num_samples=4, seq_len=32)
    config = QuantConfig(bits=4, group_size=32, magr=True, magr_iters=5)
    base = make_tiny_llama(seed=0, vocab=VOCAB)
    save_quantized(quantize_model(base, calib, config), root / "base", tok)
    train(
        TrainConfig(
            model=str(root / "base"),
            base="gptq",
            num_blocks=8,
            data=[str(math_file)],
            max_length=256,
            batch_size=4,
            max_steps=3,
            lr=2e-2,
            warmup=0,
            save_steps=0,
            logging_steps=1,
            progress=False,
            output=str(root / "train"),
        )
    )
    (root / "calib.txt").write_text(TEXT * 30)
    out = root / "export"
    argv = ["export", "--base", str(root / "base"), "--train-run", str(root / "train")]
    argv += ["--output", str(out), "--requantize", "--gguf", "--serve", "marlin"]
    argv += ["--serve-group-size", "64", "--calib", str(root / "calib.txt")]
    argv += ["--calib-samples", "4", "--calib-seq-len", "32", "--magr-iters", "5"]
    assert cli.main(argv) == 0
    return {"root": root, "out": out, "argv": argv}


def test_export_writes_an_exact_gguf_of_the_requantized_merge(pipeline):
    from transformers import AutoModelForCausalLM

    out = pipeline["out"]
    manifest = verify_export(out)
    assert {"marlin", "gguf", "merged-gptq"} <= set(manifest["parts"])
    assert "gguf/model.Q4_1.gguf" in manifest["files"]
    requant = load_quantized(out / "merged-gptq")  # the same re-quantization (reused)
    tensors, _ = _read_gguf(out / "gguf/model.Q4_1.gguf")
    assert assert_blocks_match(tensors, requant, "Q4_1") > 0
    loaded = AutoModelForCausalLM.from_pretrained(
        out / "gguf", gguf_file="model.Q4_1.gguf", dtype=torch.float32
    )
    want, got = _logits(requant), _logits(loaded)
    assert (got - want).abs().max() < 2e-3 * want.abs().max()
    card = (out / "README.md").read_text()
    assert "## Serving" in card and "the same model as merged-gptq/" in card
    assert "llama-cli -m EXPORT_DIR/gguf/model.Q4_1.gguf" in card and "vllm serve" in card


def test_marlin_export_passes_the_engines_rules(pipeline):
    out = pipeline["out"] / "marlin"
    qc = json.loads((out / "quantize_config.json").read_text())
    entry = json.loads((out / "config.json").read_text())["quantization_config"]
    for cfg in (qc, entry):  # vLLM reads config.json's entry, GPTQModel the file
        assert vllm_converts_to_marlin(cfg) and vllm_converts_to_marlin(cfg, "cpu")
        assert sglang_converts_to_marlin(cfg)
        assert (cfg["bits"], cfg["group_size"], cfg["sym"], cfg["desc_act"]) == (4, 64, True, False)
    base = json.loads((pipeline["root"] / "base/quantize_config.json").read_text())
    assert not vllm_converts_to_marlin(base) and not sglang_converts_to_marlin(base)  # asymmetric
    assert not vllm_converts_to_marlin({**qc, "group_size": 16})
    assert not vllm_converts_to_marlin({**qc, "bits": 8}, "cpu")
    assert not sglang_converts_to_marlin({**qc, "checkpoint_format": "marlin"})

    model = load_quantized(out)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14
    with safe_open(out / "model.safetensors", "pt") as f:
        for name, layer in layers.items():
            want = engine_shapes(layer.in_features, layer.out_features, 4, 64)
            for t, (shape, dtype) in want.items():
                sl = f.get_slice(f"{name}.{t}")
                assert (tuple(sl.get_shape()), sl.get_dtype()) == (shape, dtype), (name, t)
            # what Marlin computes, s·(q − 8) with no zeros read, is qdiablo's weight
            codes = _unpack_codes(f.get_tensor(f"{name}.qweight"), 4).float()
            scales = f.get_tensor(f"{name}.scales").float()
            marlin_w = (codes - 8) * scales.repeat_interleave(64, dim=0)
            assert torch.equal(marlin_w.t(), layer.dequantize_weight(torch.float32)), name
            zeros = _unpack_codes(f.get_tensor(f"{name}.qzeros").t().contiguous(), 4)
            assert bool((zeros == 7).all())  # v1: the symmetric zero 8 stored as 7
    card = (pipeline["out"] / "README.md").read_text()
    assert "`marlin/` is `merged/` re-quantized for the GPTQ-Marlin kernels" in card
    assert "do not fill Marlin's 128×64 tile" in card  # 64 inputs: SGLang's strict rule


def test_serving_refusals_and_the_q8_0_fallback(pipeline, tmp_path):
    root = pipeline["root"]
    base, train = root / "base", root / "train"
    with pytest.raises(UserError, match=r"does not divide .*64 inputs") as err:
        export_model(
            base,
            None,
            tmp_path / "a",
            train_run=train,
            calib=root / "calib.txt",
            serve=ServeOptions(marlin=True, marlin_group_size=128),
        )
    assert "--serve-group-size 64 or 32 or -1" in err.value.hint
    assert not (tmp_path / "a").exists()
    with pytest.raises(UserError, match="an exact --gguf needs calibration data"):
        export_model(base, None, tmp_path / "b", train_run=train, serve=ServeOptions(gguf="auto"))
    out = export_model(base, None, tmp_path / "c", train_run=train, serve=ServeOptions(gguf="q8_0"))
    tensors, _ = _read_gguf(out / "gguf/model.Q8_0.gguf")
    merged = load_exported_merged(out)
    w = merged.model.layers[1].mlp.down_proj.weight.detach().float().numpy()
    got, kind = tensors["blk.1.ffn_down.weight"]
    assert kind == "Q8_0" and not np.array_equal(got, w)
    assert np.abs(got - w).max() <= np.abs(w).max() / 127  # within a Q8_0 step
    assert "Q8_0 from the merged float weights, not exact" in (out / "README.md").read_text()
    plan = plan_gguf("auto", QuantConfig(bits=2, group_size=32), {"x": (64, 64)})
    assert (plan.qtype, plan.exact) == ("Q8_0", False) and "2-bit" in plan.reason
    plan = plan_gguf("auto", QuantConfig(bits=4, group_size=16), {"x": (64, 64)})
    assert (plan.qtype, plan.exact) == ("Q8_0", False) and "does not tile" in plan.reason


def load_exported_merged(out):
    from qdiablo.export import load_exported

    return load_exported(out, merged=True, dtype=torch.float32)


def test_an_8bit_marlin_folder_passes_and_decodes_as_uint8b128(tmp_path):
    from qdiablo.export.marlin import marlin_config

    config = marlin_config(QuantConfig(magr_iters=3), bits=8, group_size=-1)
    model, tok = _quantized(config)
    save_quantized(model, tmp_path / "m8", tok)
    qc = json.loads((tmp_path / "m8/quantize_config.json").read_text())
    assert vllm_converts_to_marlin(qc) and sglang_converts_to_marlin(qc)
    assert not vllm_converts_to_marlin(qc, "cpu")  # vLLM's CPU Marlin is 4-bit only
    with safe_open(tmp_path / "m8/model.safetensors", "pt") as f:
        for name, layer in model.named_modules():
            if not isinstance(layer, QuantLinear):
                continue
            want = engine_shapes(layer.in_features, layer.out_features, 8, -1)
            for t, (shape, dtype) in want.items():
                sl = f.get_slice(f"{name}.{t}")
                assert (tuple(sl.get_shape()), sl.get_dtype()) == (shape, dtype), (name, t)
            codes = _unpack_codes(f.get_tensor(f"{name}.qweight"), 8).float()
            marlin_w = (codes - 128) * f.get_tensor(f"{name}.scales").float()
            assert torch.equal(marlin_w.t(), layer.dequantize_weight(torch.float32)), name


def test_gguf_refuses_what_it_cannot_write_before_any_work():
    from conftest import make_tokenizer
    from transformers import LlamaConfig, OPTConfig

    from qdiablo.export.gguf import check_gguf_inputs

    llama = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4)
    assert check_gguf_inputs(llama, make_bpe_tokenizer())["pre"] == "gpt-2"
    with pytest.raises(UserError, match="no BPE merges"):
        check_gguf_inputs(LlamaConfig(vocab_size=261), make_tokenizer())
    with pytest.raises(UserError, match=r"LLaMA-architecture models .* this one is opt"):
        check_gguf_inputs(OPTConfig(), make_bpe_tokenizer())
    with pytest.raises(UserError, match="rope scaling 'linear'"):
        rope = {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}
        check_gguf_inputs(LlamaConfig(rope_parameters=rope), make_bpe_tokenizer())
    with pytest.raises(UserError, match="token id 267 but the model's vocabulary is 200"):
        check_gguf_inputs(LlamaConfig(vocab_size=200), make_bpe_tokenizer())
