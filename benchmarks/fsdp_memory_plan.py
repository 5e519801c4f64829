"""Per-GPU memory plan under FSDP2: the real qdiablo model structure, built on the meta device.

For each config (LLaMA-2-7B, LLaMA-2-70B, LLaMA-3.1-405B, or --tiny: the tests' tiny LLaMA) and
bit width, it builds the Hugging Face model on `meta`, swaps every decoder linear layer for a
packed `QuantLinear` (group 128; tiny: 32), wraps the default targets with DiaBlo blocks (N=64;
tiny: 8), and sums each tensor's FSDP2 shard per rank: FSDP2 shards dim 0 into `ceil(d0/W)`
rows, so a rank holds at most that many. Columns (bytes per GPU):

    packed base   QuantLinear's packed tensors (codes, zeros, fp16 scales, g_idx)
    other base    embeddings, norms and output head in bf16 (tiny: fp32, as the test runs)
    adapter       the fp32 blocks;  grads: their fp32 gradients;  AdamW: exp_avg + exp_avg_sq

QLoRA at the matched LoRA rank (the one with DiaBlo's parameter count) is computed from the same
layer shapes: NF4 codes (1/2 byte per weight) + double-quantized absmax (1 byte per 64 weights +
an fp32 per 256 blocks), LoRA A/B in fp32 with their gradients and AdamW state. Activations are
not included (they depend on batch and sequence, and gradient checkpointing keeps one block's).

    python benchmarks/fsdp_memory_plan.py            # the three large configs, 2 and 4 bits
    python benchmarks/fsdp_memory_plan.py --tiny     # the tests' tiny model, 4 bits, 1/2 ranks
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig

from qdiablo.adapters.budget import lora_parameters, matched_rank
from qdiablo.diablo.config import DEFAULT_TARGETS
from qdiablo.memory.shapes import build_on_meta
from qdiablo.memory.state import lora_state_bytes, nf4_base_bytes, state_bytes
from quantizers import QuantLinear

# The arithmetic (tensor sums, FSDP2 shards, NF4 and LoRA sizes) lives in qdiablo.memory, which
# `qdiablo plan` uses too: one source for both.
CONFIGS = {
    "LLaMA-2-7B": dict(hidden=4096, inter=11008, layers=32, heads=32, kv=32, vocab=32000),
    "LLaMA-2-70B": dict(hidden=8192, inter=28672, layers=80, heads=64, kv=8, vocab=32000),
    "LLaMA-3.1-405B": dict(hidden=16384, inter=53248, layers=126, heads=128, kv=8, vocab=128256),
    "tiny (tests)": dict(hidden=64, inter=128, layers=2, heads=4, kv=2, vocab=261),
}
GiB = 1024**3


def build(spec: dict, bits: int, group: int, num_blocks: int, float_dtype: torch.dtype):
    """The qdiablo training model (packed base + DiaBlo) on the meta device."""
    config = LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        intermediate_size=spec["inter"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv"],
        tie_word_embeddings=False,
    )
    return build_on_meta(config, bits, group, float_dtype, "diablo", num_blocks, DEFAULT_TARGETS)


def plan(spec: dict, bits: int, ranks: list[int], tiny: bool) -> list[dict]:
    group, n = (32, 8) if tiny else (128, 64)
    model = build(spec, bits, group, n, torch.float32 if tiny else torch.bfloat16)
    shapes = [(m.in_features, m.out_features) for _, m in model.diablo_layers()]
    rank = matched_rank(shapes, n)
    weights = sum(i * o for i, o in shapes)
    all_linear = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear)
    )
    rows = []
    for w in ranks:
        state = state_bytes(model, w)
        nf4 = nf4_base_bytes(all_linear, w)
        lora = lora_state_bytes(shapes, rank, w)
        rows.append(
            {
                "ranks": w,
                "packed": state.packed,
                "other": state.other,
                "adapter": state.adapter,
                "grads": state.grads,
                "adamw": state.adamw,
                "total": state.packed + state.other + 4 * state.adapter,
                "qlora_rank": rank,
                "qlora_base": nf4,
                "qlora_adapter_total": lora,
                "qlora_total": nf4 + state.other + lora,
                "diablo_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "lora_params": lora_parameters(shapes, rank),
                "target_weights": weights,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny LLaMA, in bytes")
    args = parser.parse_args()
    names = ["tiny (tests)"] if args.tiny else [k for k in CONFIGS if not k.startswith("tiny")]
    bit_widths = [4] if args.tiny else [2, 4]
    ranks = [1, 2] if args.tiny else [1, 2, 4, 8]
    unit, fmt = (1, "{:,.0f}") if args.tiny else (GiB, "{:.2f}")
    print(f"{'bytes' if args.tiny else 'GiB'} per GPU")
    print(
        "| model | bits | GPUs | packed base | other base | adapter | grads | AdamW | total "
        "| QLoRA r | QLoRA NF4 base | QLoRA adapter+grads+AdamW | QLoRA total |"
    )
    print("|" + "---|" * 13)
    for name in names:
        for bits in bit_widths:
            for r in plan(CONFIGS[name], bits, ranks, args.tiny):
                cells = [name, bits, r["ranks"]]
                cells += [
                    fmt.format(r[k] / unit)
                    for k in ("packed", "other", "adapter", "grads", "adamw", "total")
                ]
                cells += [r["qlora_rank"]]
                cells += [
                    fmt.format(r[k] / unit)
                    for k in ("qlora_base", "qlora_adapter_total", "qlora_total")
                ]
                print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
