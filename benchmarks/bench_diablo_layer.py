"""DiaBlo vs PEFT LoRA, one layer, forward + backward, at a matched trainable-parameter count.

Both run side by side in one process, interleaved, so that machine noise hits both alike; the
figure to read is the median of the per-round time ratios DiaBlo/LoRA.

    python benchmarks/bench_diablo_layer.py                 # CPU, all shapes
    python benchmarks/bench_diablo_layer.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from qdiablo import DiaBloLinear

SHAPES = {
    "llama7b-attn 4096→4096": (4096, 4096),
    "llama7b-up 4096→11008": (4096, 11008),
    "llama7b-down 11008→4096": (11008, 4096),
    "smollm2-q 576→576": (576, 576),
    "smollm2-kv 576→192": (576, 192),
    "smollm2-up 576→1536": (576, 1536),
    "smollm2-down 1536→576": (1536, 576),
}


class OneLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def make_pair(fin: int, fout: int, n: int, dropout: float, device, dtype):
    from qdiablo.optional import import_peft

    peft = import_peft()
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

    base = nn.Linear(fin, fout, bias=False, device=device, dtype=dtype)
    base.weight.requires_grad_(False)
    diablo = DiaBloLinear(base, n, dropout=dropout)
    with torch.no_grad():
        diablo.blocks.normal_(std=0.01)
    rank = max(1, round(fin * fout / n / (fin + fout)))
    lora_base = nn.Linear(fin, fout, bias=False, device=device, dtype=dtype)
    lora_base.weight.data.copy_(base.weight.data)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=["proj"])
    lora = get_peft_model(OneLayer(lora_base), config)
    for name, p in lora.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # trainable in fp32, as PEFT's autocast_adapter_dtype does
    return diablo, lora, rank


def step_time(layer, x, dy, sync) -> float:
    sync()
    t = time.perf_counter()
    y = layer(x)
    y.backward(dy)
    sync()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--num-blocks", type=int, default=64)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(
        f"# DiaBlo vs LoRA layer fwd+bwd: {args.tokens} tokens, N={args.num_blocks}, "
        f"dropout {args.dropout}, {args.dtype} on {args.device} "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__})"
    )
    print("| shape | N | LoRA r (matched) | DiaBlo ms | LoRA ms | ratio DiaBlo/LoRA (median) |")
    print("|---|---|---|---|---|---|")
    for label in args.shapes:
        fin, fout = SHAPES[label]
        torch.manual_seed(0)
        diablo, lora, rank = make_pair(fin, fout, args.num_blocks, args.dropout, device, dtype)
        x = torch.randn(1, args.tokens, fin, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(1, args.tokens, fout, device=device, dtype=dtype)
        for _ in range(3):
            step_time(diablo, x, dy, sync)
            step_time(lora, x, dy, sync)
        td, tl, ratios = [], [], []
        for r in range(args.rounds):
            pair = [(diablo, td), (lora, tl)]
            for layer, times in pair if r % 2 == 0 else pair[::-1]:
                times.append(step_time(layer, x, dy, sync))
            ratios.append(td[-1] / tl[-1])
        print(
            f"| {label} | {args.num_blocks} | {rank} | {1e3 * statistics.median(td):.2f} | "
            f"{1e3 * statistics.median(tl):.2f} | {statistics.median(ratios):.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
