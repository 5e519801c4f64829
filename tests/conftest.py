"""Shared fixtures: tiny LLaMA-architecture models built from a config, and a real byte-level
tokenizer, saved as a Hugging Face folder so the real `from_pretrained` code paths run."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch

from qdiablo.errors import UserError
from qdiablo.optional import import_bitsandbytes, prepare_trainer_imports

# QDIABLO_TEST_THREADS=1 avoids OpenMP oversubscription on a machine shared with other jobs.
_THREADS = os.environ.get("QDIABLO_TEST_THREADS") or max(1, min(2, os.cpu_count() or 1))
torch.set_num_threads(int(_THREADS))

# Tests import PEFT and bitsandbytes directly (importorskip): import them first the way qdiablo
# does (qdiablo.optional), so that bitsandbytes never looks for a hub kernel during the suite.
with contextlib.suppress(UserError):
    prepare_trainer_imports()
    import_bitsandbytes()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer():
    """A real byte-level BPE tokenizer (no merges): 256 byte tokens plus specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    from tokenizers.processors import TemplateProcessing

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


def make_tiny_llama(
    seed: int = 0,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 261,
    dtype: torch.dtype = torch.float32,
    init_range: float = 0.02,
):
    """A random LLaMA-architecture causal LM small enough for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
        initializer_range=init_range,
    )
    model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny LLaMA plus tokenizer saved as a Hugging Face folder (read-only for tests)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(seed=0).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def math_file(tmp_path_factory):
    """Short Math10K-format records, so that a tiny model trains on them in milliseconds."""
    path = tmp_path_factory.mktemp("data") / "arith.jsonl"
    rows = []
    for i in range(40):
        a, b = 3 + 7 * i % 50, 11 + 5 * i % 40
        rows.append(
            {
                "instruction": f"What is {a} plus {b}?",
                "input": "",
                "output": f"{a} + {b} = {a + b}.",
                "answer": str(a + b),
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
