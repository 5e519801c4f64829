"""Issue 19's tables, re-derived from the memory planner (`qdiablo plan`, qdiablo.memory): each
verb's host and GPU peak for LLaMA-2-7B at W2 and W4 and LLaMA-2-70B, and the question QLoRA made
famous, asked of a 70B at 2 bits with DiaBlo on one 48 GB GPU.

    python benchmarks/memory_plan_tables.py          # markdown for docs/memory.md, BENCHMARKS.md

Setups: GPTQ W2 g64 / W4 g128, DiaBlo N=64 (dropout 0.05) on q, k, v, up, down; training at
micro-batch 1 × 2048 tokens, bf16 autocast on bf16 float weights, gradient checkpointing, AdamW;
quantize with 128 × 2048-token calibration windows (bf16 activations); eval of 16 prompts of 256
tokens, 512 new tokens, without the dequantized copy; export --merged in 5 GiB shards. A GPU of
"N GB" is N GiB; what a run may use is 90 % of it less 0.5 GiB (`usable`).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from qdiablo.memory.plan import GiB, MemoryPlan, usable  # noqa: E402
from qdiablo.memory.settings import PlanSettings  # noqa: E402
from qdiablo.memory.shapes import load_source  # noqa: E402

SETUPS = [
    ("llama-2-7b", 2, 64),
    ("llama-2-7b", 4, 128),
    ("llama-2-70b", 2, 64),
    ("llama-2-70b", 4, 128),
]


def verbs_table() -> str:
    lines = [
        "| model | bits | verb | host GiB | GPU GiB "
        "| largest micro-batch × 2048 on 24 / 48 / 80 GB |",
        "|---|---|---|---|---|---|",
    ]
    for name, bits, group in SETUPS:
        plan = MemoryPlan(load_source(name), PlanSettings(bits=bits, group_size=group))
        fits = " / ".join(str(plan.largest_micro_batch(g * GiB)) for g in (24, 48, 80))
        for peak in plan.peaks():
            extra = fits if peak.verb == "train" else ""
            lines.append(
                f"| {name} | W{bits} g{group} | {peak.verb} | {peak.host / GiB:.1f} | "
                f"{peak.device / GiB:.1f} | {extra} |"
            )
    return "\n".join(lines)


def question_70b() -> str:
    """A 70B at 2 bits with DiaBlo, 1 × 2048, bf16, checkpointing, on one 48 GB GPU."""
    plan = MemoryPlan(load_source("llama-2-70b"), PlanSettings(bits=2, group_size=64))
    s = plan.state
    act = plan.train_activations()
    peak = plan.train(1, 2048).device
    lines = [
        "| part | GiB |",
        "|---|---|",
        f"| packed base (W2 g64: codes, zeros, fp16 scales, g_idx) | {s.packed / GiB:.2f} |",
        f"| embeddings, norms, head (bf16) | {(s.other + s.buffers) / GiB:.2f} |",
        f"| DiaBlo blocks N=64 (fp32) | {s.adapter / GiB:.2f} |",
        f"| their gradients | {s.grads / GiB:.2f} |",
        f"| AdamW moments | {s.adamw / GiB:.2f} |",
        f"| activations, 1 × 2048 with checkpointing | {act.peak(2048, 80, True) / GiB:.2f} |",
        f"| **peak** | **{peak / GiB:.2f}** |",
        f"| usable on a 48 GB GPU | {usable(48 * GiB) / GiB:.2f} |",
    ]
    b = plan.largest_micro_batch(48 * GiB)
    lines.append("")
    base = (s.packed + s.other + s.buffers) / GiB
    lines.append(
        f"It fits: the largest micro-batch is {b} × 2048 tokens. On a 24 GB GPU "
        f"({usable(24 * GiB) / GiB:.1f} GiB usable) it does not: the frozen base alone is "
        f"{base:.1f} GiB and dequantizing its largest layer takes {act.dequant / GiB:.2f} GiB "
        "more, before any adapter, gradient, AdamW moment or activation; that needs 2 GPUs "
        "(FSDP2, `--processes 2`)."
    )
    return "\n".join(lines)


def main() -> None:
    print(verbs_table())
    print()
    print(question_70b())


if __name__ == "__main__":
    main()
