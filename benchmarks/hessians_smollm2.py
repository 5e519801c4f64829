"""Why GPTQ's Cholesky fails on SmolLM2-135M: each layer's calibration Hessian H = XᵀX/n with
the per-batch products XᵀX rounded to bfloat16 (the old `calib_dtype=bfloat16` path) against
products summed in float32, both from the same bf16-autocast forward passes.

For each Hessian it records the smallest eigenvalue relative to mean(diag H), the largest
diagonal entry relative to the mean, the dead inputs, and the damping GPTQ's Cholesky needs.

    python benchmarks/hessians_smollm2.py --out runs/hessians-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from eval.perplexity import math10k_texts
from qdiablo.models import load_model, load_tokenizer
from quantizers import tokenize_calibration
from quantizers.calibration import (
    block_linears,
    capture_block_inputs,
    find_decoder_blocks,
    input_groups,
    run_block,
)
from quantizers.gptq import CholeskyError, damped_inverse_cholesky


def bf16_rounded_hessians(block, linears, groups, hidden, kwargs) -> dict[str, torch.Tensor]:
    """H with each batch's XᵀX computed and rounded in bfloat16 (what the old code did)."""
    H: dict[str, torch.Tensor] = {}
    n: dict[str, int] = {}
    firsts = {g[0] for g in groups}

    def hook(name):
        def pre(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.bfloat16)
            H[name] = H.get(name, 0) + (x.t() @ x).float()
            n[name] = n.get(name, 0) + x.shape[0]

        return pre

    handles = [linears[g].register_forward_pre_hook(hook(g)) for g in firsts]
    with torch.no_grad():
        for h, kw in zip(hidden, kwargs):
            block(h, **kw)
    for handle in handles:
        handle.remove()
    return {k: v / n[k] for k, v in H.items()}


def fp32_hessians(block, linears, groups, hidden, kwargs) -> dict[str, torch.Tensor]:
    from quantizers.calibration import collect_hessians

    return collect_hessians(block, linears, groups, hidden, kwargs, product_dtype=torch.bfloat16)


def describe(H: torch.Tensor, damp: float) -> dict:
    mean = float(H.diagonal().mean())
    eig = torch.linalg.eigvalsh(H.double())
    try:
        _, used = damped_inverse_cholesky(H, damp)
    except CholeskyError:
        used = None
    return {
        "min_eig_rel": float(eig[0]) / mean,
        "max_diag_rel": float(H.diagonal().max()) / mean,
        "dead": int((H.diagonal() == 0).sum()),
        "damp_needed": used,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/hessians-smollm2.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer("smollm2")
    model = load_model("smollm2")
    calib = tokenize_calibration(
        tokenizer, math10k_texts("SVAMP", with_output=False), args.calib_samples, 256
    )
    prefix, blocks = find_decoder_blocks(model)
    cpu = torch.device("cpu")
    rows = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden, kwargs = capture_block_inputs(model, blocks, calib, cpu)
        for i, block in enumerate(blocks):
            linears = block_linears(block, f"{prefix}.{i}")
            groups = input_groups(block, linears, hidden[0], kwargs[0])
            rounded = bf16_rounded_hessians(block, linears, groups, hidden, kwargs)
            exact = fp32_hessians(block, linears, groups, hidden, kwargs)
            for name in rounded:
                row = {
                    "layer": f"{prefix}.{i}.{name}",
                    "bf16_products": describe(rounded[name], args.damp),
                    "fp32_products": describe(exact[name], args.damp),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            hidden = run_block(block, hidden, kwargs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    for key in ("bf16_products", "fp32_products"):
        retried = [r for r in rows if r[key]["damp_needed"] != args.damp]
        print(f"{key}: Cholesky needed more than damp {args.damp} on {len(retried)}/{len(rows)}")


if __name__ == "__main__":
    main()
