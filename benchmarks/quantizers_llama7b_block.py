"""CPU timing of one LLaMA-7B-shaped decoder block, extrapolated to the whole model.

One LlamaDecoderLayer with LLaMA-7B's shapes (hidden 4096, intermediate 11008, 32 heads) and
random weights, fed random hidden states. Each stage is timed on this block:

- calibration: the true-sequential forward passes that collect the four input Hessians, on
  `--tokens` tokens, scaled linearly to GPTQ's usual 128 x 2048 tokens;
- MagR: `--magr-iters` iterations of each layer group, scaled to the full iteration count, for
  qdiablo's solver (FISTA, bf16 matmuls where the CPU has them, 50 iterations) and for the
  paper's (plain proximal gradient in fp32, 200 iterations);
- GPTQ (with its Cholesky factorisations) and one coordinate-descent sweep: run in full.

Everything is then multiplied by 32 blocks. These are EXTRAPOLATIONS from one block and a few
iterations, not a measured whole-model run.

    python benchmarks/quantizers_llama7b_block.py --out runs/bench-llama7b-block.json
    python benchmarks/quantizers_llama7b_block.py --device cuda   # GPU (benchmarks/gpu_suite.py)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

from quantizers.calibration import block_linears, collect_hessians, input_groups
from quantizers.cd import cd_refine
from quantizers.gptq import gptq_quantize
from quantizers.magr import fast_matmul_dtype, magr

BLOCKS = 32
REFERENCE_TOKENS = 128 * 2048


def timed(fn):
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - start


def _sync() -> None:
    """GPU work is asynchronous: wait for it so that wall times are real."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens actually run")
    p.add_argument("--magr-iters", type=int, default=2, help="MagR iterations actually run")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=Path("runs/bench-llama7b-block.json"))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32
    )
    torch.manual_seed(0)
    block = LlamaDecoderLayer(config, layer_idx=0).eval().to(device)
    with torch.no_grad():
        for w in block.parameters():
            if w.dim() == 2:
                w.normal_(0, 0.02)
    seq = 512
    batches = max(1, args.tokens // seq)
    hidden = [torch.randn(1, seq, 4096, device=device) for _ in range(batches)]
    rope = LlamaRotaryEmbedding(config).to(device)
    pos = torch.arange(seq, device=device)[None]
    kwargs = [{"position_embeddings": rope(hidden[0], pos), "position_ids": pos}] * batches
    tokens = batches * seq
    fast = fast_matmul_dtype(device.type)
    linears = block_linears(block, "block")
    groups = input_groups(block, linears, hidden[0], kwargs[0])

    autocast = torch.autocast(device.type, dtype=fast or torch.float32, enabled=fast is not None)
    calib_s = 0.0
    hessians = {}
    for group in groups:  # one true-sequential stage per group, bf16 forward where fast
        with autocast:
            H, s = timed(
                lambda g=group: collect_hessians(block, linears, [g], hidden, kwargs, fast)
            )
        hessians.update(H)
        calib_s += s
    with torch.no_grad(), autocast:
        _, out_s = timed(lambda: [block(h, **kw) for h, kw in zip(hidden, kwargs)])
    calib_s += out_s

    stages = {"magr_fast": 0.0, "magr_plain": 0.0, "gptq": 0.0, "cd_sweep": 0.0}
    for group in groups:
        W = torch.cat([linears[n].weight.detach() for n in group])
        H = hessians[group[0]]
        n = args.magr_iters
        _, s = timed(lambda W=W, H=H, n=n: magr(W, H, 1e-4, n, 128, True, fast))
        stages["magr_fast"] += s / n * 50
        _, s = timed(lambda W=W, H=H, n=n: magr(W, H, 1e-4, n, 128, False, None))
        stages["magr_plain"] += s / n * 200
        result, s = timed(lambda W=W, H=H: gptq_quantize(W, H, 4, 128))
        stages["gptq"] += s
        _, s = timed(lambda W=W, H=H, r=result: cd_refine(W, r, H, 1))
        stages["cd_sweep"] += s
        print(f"{'+'.join(group)}: done", flush=True)

    scale = REFERENCE_TOKENS / tokens
    block_s = {
        "calibration (128x2048 tokens)": calib_s * scale,
        "MagR, qdiablo (FISTA, 50 it)": stages["magr_fast"],
        "MagR, paper (plain fp32, 200 it)": stages["magr_plain"],
        "GPTQ W4 g128": stages["gptq"],
        "coordinate descent, 1 sweep": stages["cd_sweep"],
    }
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": (torch.cuda.get_device_name(device) + ", " if device.type == "cuda" else "")
        + f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} thread(s), MagR matmul dtype {fast}",
        "measured": {
            "calibration_tokens_run": tokens,
            "calibration_s": calib_s,
            "magr_iterations_run_per_group": args.magr_iters,
        },
        "per_block_s (extrapolated)": block_s,
        "whole_model_min (extrapolated, x32 blocks)": {
            k: v * BLOCKS / 60 for k, v in block_s.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
