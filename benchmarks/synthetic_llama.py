"""A seeded random LLaMA-shaped checkpoint, written shard by shard: what the scale benchmarks and
tests quantize and export when no real checkpoint of that size can be downloaded.

    python benchmarks/synthetic_llama.py --size 1.1b --output /work/runs/synth-1.1b
    python benchmarks/synthetic_llama.py --size 0.3b --output /work/runs/synth-0.3b

The folder is what a Hugging Face model folder holds: config.json, generation_config.json,
bfloat16 safetensors shards (2 GB each, with model.safetensors.index.json), and a byte-level
tokenizer (no merges: one token per byte, so any text tokenizes). Weights are N(0, 0.02), norms 1,
each tensor drawn from its own seeded generator, so the files are the same on every machine and
the whole model is never in memory (one tensor at a time). Random weights make no sense as a
language model; they have the real shapes, which is all memory and speed depend on.

Sizes: `1.1b` is TinyLlama-1.1B's shape (hidden 2048, 22 layers, intermediate 5632, 32 heads /
4 KV heads, vocab 32000: 1.10 B parameters); `0.3b` (hidden 1024, 24 layers, intermediate 2816,
16 / 4 heads, vocab 32000: 0.34 B); `tiny` (hidden 64, 3 layers: what the tests use).
"""

from __future__ import annotations

import argparse
import sys
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SIZES = {
    "1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "0.3b": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
    ),
}


def llama_config(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(
        **SIZES[size],
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges (256 byte tokens and <unk>, <s>, </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def tensor_value(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The tensor `name`: ones for norms, else N(0, 0.02) from a generator seeded by its name."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)


def write_synthetic(
    size: str, output: str | Path, seed: int = 0, max_shard_size: int = 2 * 10**9
) -> Path:
    """Write the checkpoint folder (see the module docstring) and return its path."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, GenerationConfig

    from quantizers.shards import ShardWriter

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    config = llama_config(size)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    writer = ShardWriter(output, max_shard_size, metadata={"format": "pt"})
    for name, t in model.state_dict().items():
        writer.add(name, tensor_value(name, tuple(t.shape), seed))
    writer.finish()
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(output)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(output)
    byte_tokenizer().save_pretrained(output)
    params = sum(t.numel() for t in model.state_dict().values())
    print(f"wrote {output}: {size}, {params / 1e9:.3f} B parameters (bfloat16), seed {seed}")
    return output


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-size", type=int, default=2 * 10**9, help="bytes per shard")
    args = p.parse_args()
    write_synthetic(args.size, args.output, args.seed, args.max_shard_size)


if __name__ == "__main__":
    main()
