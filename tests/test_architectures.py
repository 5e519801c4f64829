"""The whole product on every supported architecture: tiny random configs of LLaMA, Mistral,
Qwen2, Qwen3, Gemma2, Gemma3, Phi-3, OPT, GPT-NeoX and Falcon, each run through MagR+GPTQ at 2
and 4 bits -> save -> load -> DiaBlo with the architecture's default targets -> one training step
-> merge -> export -> reload, and evaluation's batched greedy decoding and reference NLL against
one-example-at-a-time references (docs/architecture.md, "A new architecture")."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from eval.generate import greedy_batch, inference_context
from eval.nll import batch_nll
from qdiablo import DiaBloConfig, get_diablo_model
from qdiablo.diablo.targets import DEFAULT_TARGETS_BY_MODEL_TYPE, default_target_modules
from qdiablo.errors import UserError
from qdiablo.export import export_model, load_exported
from qdiablo.train import TrainConfig
from qdiablo.train.bases import LoadedBase
from qdiablo.train.setup import attach_adapter
from quantizers import QuantConfig, QuantLinear, load_quantized, quantize_model, save_quantized
from quantizers.calibration import find_decoder_blocks

VOCAB = 96
LAYERS = 2
NUM_BLOCKS = 4  # divides every layer size below (32, 64, 96, 128, 192, 256)
TOKENS = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAMA_LIKE = dict(
    **TOKENS,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LLAMA_TARGETS = {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}

# name -> (a tiny config, the layer names the default targets must wrap in each block)
ARCHITECTURES = {
    "llama": (lambda: transformers.LlamaConfig(**LLAMA_LIKE), LLAMA_TARGETS),
    "mistral": (lambda: transformers.MistralConfig(**LLAMA_LIKE), LLAMA_TARGETS),
    "qwen2": (lambda: transformers.Qwen2Config(**LLAMA_LIKE), LLAMA_TARGETS),
    "qwen3": (lambda: transformers.Qwen3Config(**LLAMA_LIKE, head_dim=16), LLAMA_TARGETS),
    "gemma2": (lambda: transformers.Gemma2Config(**LLAMA_LIKE, head_dim=16), LLAMA_TARGETS),
    "gemma3": (lambda: transformers.Gemma3TextConfig(**LLAMA_LIKE, head_dim=16), LLAMA_TARGETS),
    "phi3": (
        lambda: transformers.Phi3Config(**LLAMA_LIKE),
        {"qkv_proj", "gate_up_proj", "down_proj"},
    ),
    "opt": (
        lambda: transformers.OPTConfig(
            **TOKENS,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=64,
        ),
        {"q_proj", "k_proj", "v_proj", "fc1", "fc2"},
    ),
    "gpt_neox": (
        lambda: transformers.GPTNeoXConfig(
            **TOKENS,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
        {"query_key_value", "dense_h_to_4h", "dense_4h_to_h"},
    ),
    "falcon": (
        lambda: transformers.FalconConfig(
            **TOKENS, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4
        ),
        {"query_key_value", "dense_h_to_4h", "dense_4h_to_h"},
    ),
}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_quantize_train_merge_export_reload(arch, bits, tmp_path):
    make_config, expected_targets = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make_config()).eval()
    calib = [torch.randint(3, VOCAB, (2, 16))]  # two calibration windows of 16 tokens
    ids = torch.randint(3, VOCAB, (2, 12))

    # quantize (MagR + GPTQ) -> save -> load: the loaded base computes what the quantized one did
    group_size = 32 if bits == 2 else -1
    config = QuantConfig(bits=bits, group_size=group_size, magr=True, magr_iters=5)
    prefix, blocks = find_decoder_blocks(model)
    block_linears = [f"{prefix}.{n}" for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]
    quantize_model(model, calib, config)
    packed = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert packed == block_linears  # every linear layer of every block, nothing else
    save_quantized(model, tmp_path / "base")
    base = load_quantized(tmp_path / "base")
    assert [n for n, m in base.named_modules() if isinstance(m, QuantLinear)] == packed
    assert torch.equal(_logits(base, ids), _logits(model, ids))

    # DiaBlo with the architecture's default targets
    diablo = get_diablo_model(base, DiaBloConfig(num_blocks=NUM_BLOCKS, dropout=0.0))
    wrapped = [name for name, _ in diablo.diablo_layers()]
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == expected_targets
    assert len(wrapped) == LAYERS * len(expected_targets)
    assert set(diablo.diablo_config.target_modules) == expected_targets  # saved as a list

    # one training step moves the blocks and nothing else
    diablo.train()
    optimizer = torch.optim.AdamW([p for p in diablo.parameters() if p.requires_grad], lr=1e-2)
    loss = diablo(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(bool(layer.blocks.abs().sum() > 0) for _, layer in diablo.diablo_layers())
    diablo.eval()
    adapted = _logits(diablo, ids)
    assert not torch.equal(adapted, _logits(model, ids))

    # export (base/ + adapter/ + merged/) -> reload: the same logits as before the export
    diablo.save_pretrained(tmp_path / "adapter")
    out = export_model(
        tmp_path / "base",
        tmp_path / "adapter",
        tmp_path / "export",
        merged=True,
        merged_dtype="float32",
    )
    assert torch.equal(_logits(load_exported(out), ids), adapted)
    merged = load_exported(out, merged=True)
    assert not any(isinstance(m, QuantLinear) for m in merged.modules())
    merged_logits = _logits(merged, ids)
    # x·(W + Dᵀ) against x·W + x·D: the same in exact arithmetic, float32 rounding apart
    torch.testing.assert_close(merged_logits, adapted, rtol=1e-4, atol=1e-4)
    # and the in-memory merge is the exported one, bit for bit
    assert torch.equal(_logits(diablo.merge_and_unload(), ids), merged_logits)


def test_every_tested_architecture_has_a_default():
    tested = {make().model_type for make, _ in ARCHITECTURES.values()}
    assert tested <= set(DEFAULT_TARGETS_BY_MODEL_TYPE)


def test_an_unsupported_architecture_is_named_with_what_to_pass():
    config = transformers.GPT2Config(**TOKENS, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    gpt2 = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(UserError) as err:
        default_target_modules(gpt2)
    assert "'gpt2'" in str(err.value)
    assert "target_modules" in err.value.hint and "--target-modules" in err.value.hint
    with pytest.raises(UserError, match="'gpt2'"):
        get_diablo_model(gpt2, DiaBloConfig(num_blocks=2))
    # an explicit choice still goes through the usual checks (GPT-2's Conv1D is refused)
    with pytest.raises(UserError, match="Conv1D"):
        get_diablo_model(gpt2, DiaBloConfig(num_blocks=2, target_modules=["c_attn"]))


@pytest.mark.parametrize("adapter", ["diablo", "lora"])
def test_training_gives_lora_the_same_default_targets_as_diablo(adapter):
    if adapter == "lora":
        pytest.importorskip("peft")
    make_config, expected_targets = ARCHITECTURES["phi3"]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make_config())
    config = TrainConfig(adapter=adapter, num_blocks=NUM_BLOCKS, match_params=True)
    adapted, budget, _ = attach_adapter(LoadedBase(model, None, "fp", "tiny phi3"), config)
    marker = ".blocks" if adapter == "diablo" else ".lora_A."
    wrapped = {
        name.split(marker)[0].rsplit(".", 1)[-1]
        for name, p in adapted.named_parameters()
        if p.requires_grad and marker in name
    }
    assert wrapped == expected_targets
    assert budget.num_layers == LAYERS * len(expected_targets)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_batched_greedy_generation_equals_one_at_a_time_generate(arch):
    """Evaluation's own decoding loop (left padding, explicit positions, a KV cache that drops
    finished rows) on each architecture, against transformers' `generate`, one prompt at a time.
    In float64, so that near-tied logits of a random model cannot flip; Gemma2 in float32, since
    transformers gives it NaN logits on left-padded rows in float64."""
    make_config, _ = ARCHITECTURES[arch]
    torch.manual_seed(0)
    dtype = torch.float32 if arch == "gemma2" else torch.float64
    model = transformers.AutoModelForCausalLM.from_config(make_config()).to(dtype).eval()
    prompts = [[5, 9, 11, 40, 7, 3, 8], [12, 30], [4, 4, 4, 4, 50]]
    eos = TOKENS["eos_token_id"]
    with inference_context(model):
        batched = greedy_batch(
            model, prompts, max_new_tokens=6, eos_token_ids=[eos], pad_token_id=0
        )
    for prompt, (tokens, stopped) in zip(prompts, batched):
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        assert tokens + ([eos] if stopped == "eos" else []) == out


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_batched_reference_nll_equals_one_example_at_a_time(arch):
    """Evaluation's NLL batch (left padding, explicit positions, logits_to_keep) against a plain
    forward pass per example and a cross-entropy written out here."""
    make_config, _ = ARCHITECTURES[arch]
    torch.manual_seed(0)
    dtype = torch.float32 if arch == "gemma2" else torch.float64  # see the test above
    model = transformers.AutoModelForCausalLM.from_config(make_config()).to(dtype).eval()
    examples = [
        {"input_ids": [5, 9, 11, 40, 7, 3, 8, 2], "labels": [-100] * 4 + [7, 3, 8, 2]},
        {"input_ids": [12, 30, 44, 2], "labels": [-100, 30, 44, 2]},
    ]
    with inference_context(model):
        batched = batch_nll(model, examples, pad_token_id=0)
        for example, (nll_sum, count) in zip(examples, batched):
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(example["labels"][1:])
            scored = targets != -100
            log_probs = torch.log_softmax(logits[scored].double(), dim=-1)
            expected = -float(log_probs.gather(1, targets[scored][:, None]).sum())
            assert count == int(scored.sum())
            assert nll_sum == pytest.approx(expected, rel=1e-6 if dtype == torch.float32 else 1e-10)
