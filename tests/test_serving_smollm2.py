"""The GGUF export on the real SmolLM2-135M-Instruct (slow): quantized at 4 bits, group size 64,
with MagR + GPTQ, two DiaBlo steps, exported with `--requantize --gguf`. Its Q4_1 blocks read
back as the re-quantized model's weights, and transformers loads the file (as it loads the
embedded SmolLM2) with its tokenizer and logits within fp16 noise of that model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_serving import _read_gguf, assert_blocks_match, with_gguf_weights
from transformers import AutoModelForCausalLM, AutoTokenizer

from eval.perplexity import math10k_texts
from qdiablo.export import export_model
from qdiablo.export.serving import ServeOptions
from qdiablo.models import load_model, load_tokenizer
from quantizers import QuantConfig, QuantLinear, load_quantized, quantize_model, save_quantized
from quantizers.calibration import tokenize_calibration

pytestmark = pytest.mark.slow

CALIB = "qdiablo/resources/math10k/train/math_1k_pyreft_e01e9d4.jsonl"


def test_smollm2_w4g64_gguf_is_exact_and_transformers_runs_it(tmp_path):
    from qdiablo.train import TrainConfig, train

    root = Path(__file__).resolve().parents[1]
    tokenizer = load_tokenizer("smollm2")
    calib = tokenize_calibration(tokenizer, math10k_texts("SVAMP", with_output=False), 8, 128)
    config = QuantConfig(bits=4, group_size=64, magr=True, magr_iters=10)
    model = quantize_model(load_model("smollm2"), calib, config, calib_dtype="auto")
    save_quantized(model, tmp_path / "base", tokenizer)
    del model
    train(
        TrainConfig(
            model=str(tmp_path / "base"),
            base="gptq",
            max_records=8,
            max_length=256,
            batch_size=2,
            max_steps=2,
            save_steps=0,
            logging_steps=1,
            progress=False,
            output=str(tmp_path / "train"),
        )
    )
    out = export_model(
        tmp_path / "base",
        None,
        tmp_path / "export",
        train_run=tmp_path / "train",
        requantize_merged=True,
        calib=root / CALIB,
        calib_samples=8,
        calib_seq_len=128,
        serve=ServeOptions(gguf="auto"),
    )
    requant = load_quantized(out / "merged-gptq").float().eval()
    tensors, _ = _read_gguf(out / "gguf/model.Q4_1.gguf")
    worst = assert_blocks_match(tensors, requant, "Q4_1")
    # |m| <= 15·s, so fp16 rounds it by at most half an ulp: 2^-11·15·s
    s_max = max(
        m.packed_tensors().scales.float().max().item()
        for m in requant.modules()
        if isinstance(m, QuantLinear)
    )
    assert 0 < worst <= 2**-11 * 15 * s_max
    assert tensors["token_embd.weight"][1] == "F16" and "output.weight" not in tensors  # tied

    gguf_tok = AutoTokenizer.from_pretrained(out / "gguf", gguf_file="model.Q4_1.gguf")
    chat = [{"role": "user", "content": "Natalia sold 48 clips in April. How many in May?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert gguf_tok(ids).input_ids == tokenizer(ids).input_ids
    loaded = AutoModelForCausalLM.from_pretrained(
        out / "gguf", gguf_file="model.Q4_1.gguf", dtype=torch.float32
    )
    x = torch.tensor([tokenizer(ids).input_ids])
    with torch.no_grad():
        want, got = requant(input_ids=x).logits, loaded(input_ids=x).logits
        exact = with_gguf_weights(requant, tensors)(input_ids=x).logits
    scale = want.abs().max().item()
    # transformers computes with exactly the file's weights (float32 rounding only) ...
    assert (got - exact).abs().max().item() < 1e-4 * scale
    # ... which differ from qdiablo's by the fp16 rounding of m and of the tied embeddings
    diff = (got - want).abs().max().item()
    print(f"\nSmolLM2 W4 g64 GGUF: max |Δlogit| {diff:.4g} of max |logit| {scale:.4g}")
    assert diff < 2e-2 * scale  # measured 1.7e-3 and 5.5e-3 (two runs)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95
