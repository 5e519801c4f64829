"""The quantizers on the real SmolLM2-135M-Instruct (marked slow): calibrate on SVAMP questions,
measure perplexity on GSM8K questions with their solutions (another source).

Its "full-precision" weights are the GGUF's Q4_1 weights dequantized, so nothing is asserted at
4 bits (re-quantizing them at 4 bits is nearly lossless). At 2 bits every method is far from
usable on a 135M model (perplexity in the thousands); the assertion is only the ordering.
"""

import copy

import pytest
import torch

from eval.perplexity import math10k_texts, perplexity, token_windows
from quantizers import QuantConfig, QuantLinear, quantize_model, tokenize_calibration

pytestmark = pytest.mark.slow

EVAL_TOKENS = 2048


@pytest.fixture(scope="module")
def smollm2():
    from qdiablo.models import load_model, load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    model = load_model("smollm2")
    questions = math10k_texts("SVAMP", with_output=False)
    windows = token_windows(tokenizer, math10k_texts("gsm8k"), 256, max_tokens=EVAL_TOKENS)
    return model, tokenizer, questions, windows


def quantized_perplexity(smollm2, samples: int, **config) -> tuple[float, torch.nn.Module]:
    base, tokenizer, questions, windows = smollm2
    model = copy.deepcopy(base)
    config = QuantConfig(group_size=64, **config)
    calib = None
    if config.method == "gptq" or config.magr:
        calib = tokenize_calibration(tokenizer, questions, samples, 256)
    quantize_model(model, calib, config, calib_dtype="auto")
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 30 * 7
    return perplexity(model, windows).perplexity, model


def test_gptq_beats_rtn_at_3_bits(smollm2):
    fp = perplexity(smollm2[0], smollm2[3]).perplexity
    rtn, _ = quantized_perplexity(smollm2, 0, method="rtn", bits=3)
    gptq, model = quantized_perplexity(smollm2, 8, bits=3)
    magr_gptq, magr_model = quantized_perplexity(smollm2, 8, bits=3, magr=True)
    print(
        f"\nSmolLM2 W3 g64 perplexity: FP {fp:.2f}, RTN {rtn:.2f}, GPTQ {gptq:.2f}, "
        f"MagR+GPTQ {magr_gptq:.2f}"
    )
    assert fp < gptq < rtn
    assert magr_gptq < rtn
    report = magr_model.quantization_report
    assert all(r.max_abs_after < r.max_abs_before for r in report.layers)
    assert model.quantization_report.mean_rel_error() < 0.15


def test_magr_gptq_beats_gptq_at_2_bits(smollm2):
    gptq, _ = quantized_perplexity(smollm2, 16, bits=2)
    magr_gptq, _ = quantized_perplexity(smollm2, 16, bits=2, magr=True)
    print(f"\nSmolLM2 W2 g64 perplexity: GPTQ {gptq:.1f}, MagR+GPTQ {magr_gptq:.1f}")
    assert magr_gptq < gptq
