"""Quality and wall time of every quantizer on the real SmolLM2-135M-Instruct (issue 3 table).

Calibrates on SVAMP questions and measures perplexity on GSM8K questions with their solutions
(two different sources), for FP and {RTN, GPTQ, MagR+RTN, MagR+GPTQ, MagR+GPTQ+CD} x
{W4, W3, W2} at group size 64. The "FP" model is the GGUF's Q4_1 weights dequantized to fp32,
not the original bf16 checkpoint, so 4-bit re-quantization is nearly lossless by construction.

    python benchmarks/quantizers_smollm2.py --out runs/bench-quantizers.json

Prints a markdown table (for BENCHMARKS.md) and writes every number to --out.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from eval.perplexity import math10k_texts, perplexity, token_windows
from qdiablo.models import load_model, load_tokenizer
from quantizers import QuantConfig, quantize_model, tokenize_calibration

METHODS = {
    "RTN": {"method": "rtn"},
    "GPTQ": {"method": "gptq"},
    "MagR+RTN": {"method": "rtn", "magr": True},
    "MagR+GPTQ": {"method": "gptq", "magr": True},
    "MagR+GPTQ+CD": {"method": "gptq", "magr": True, "cd_sweeps": None},  # 1, or 30 at W2
    "MagR+GPTQ+recon": {"method": "gptq", "magr": True, "reconstruct": True},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument(
        "--calib-source",
        default=["svamp-questions"],
        nargs="+",
        help="calibration text: svamp-questions (the table's own), or `qdiablo quantize "
        "--calib` sources (math10k, generated, a file)",
    )
    p.add_argument(
        "--heldout-source",
        nargs="+",
        default=None,
        help="reconstruction's held-out windows: a `--calib` source (default: the windows after "
        "the calibration ones in the same source; svamp-questions: its last quarter)",
    )
    p.add_argument("--heldout-samples", type=int, default=None, help="held-out windows")
    p.add_argument("--calib-seed", type=int, default=0, help="the generated source's seed")
    p.add_argument(
        "--calib-cache", type=Path, default=Path("runs/calib-cache"), help="generated windows"
    )
    p.add_argument("--calib-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument(
        "--products",
        choices=["calib", "float32"],
        default="float32",
        help="dtype of each batch's XᵀX: the forward pass's (--calib-dtype) or float32",
    )
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--cd-damp", type=float, default=None, help="override QuantConfig.cd_damp")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="override QuantConfig fields for every method, e.g. magr_solver=plain magr_iters=200 "
        "beta=0.8 recon_steps=100 (values parsed as JSON when they parse)",
    )
    p.add_argument(
        "--set-magr",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="like --set, for the MagR methods only (e.g. beta, which plain GPTQ would also read)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench-quantizers-smollm2.json"))
    p.add_argument(
        "--save-dir",
        type=Path,
        default=None,
        help="also save each quantized model here (W<b>-<method>)",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    overrides, magr_overrides = parse_sets(args.set), parse_sets(args.set_magr)

    tokenizer = load_tokenizer("smollm2")
    base = load_model("smollm2")
    calib, heldout = calibration(args, tokenizer, base)
    windows = token_windows(tokenizer, math10k_texts("gsm8k"), 256, max_tokens=args.eval_tokens)
    calib_dtype = torch.bfloat16 if args.calib_dtype == "bfloat16" else None
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} thread(s)",
        "overrides": overrides,
        "magr_overrides": magr_overrides,
        "heldout": None
        if heldout is None
        else f"{sum(b.numel() for b in heldout)} tokens of {args.heldout_source or 'the next'} "
        "windows",
        "calibration": f"{sum(b.numel() for b in calib)} tokens of {args.calib_source} "
        f"({args.calib_samples} x {args.calib_seq_len}), {args.calib_dtype} forward, "
        f"XᵀX products in {args.calib_dtype if args.products == 'calib' else 'float32'}",
        "evaluation": f"{windows.numel()} tokens of GSM8K question+solution, windows of 256",
        "rows": [],
    }
    start = time.perf_counter()
    fp = perplexity(base, windows)
    results["rows"].append(
        {
            "method": "FP (Q4_1 GGUF)",
            "bits": 32,
            "ppl": fp.perplexity,
            "eval_s": time.perf_counter() - start,
        }
    )
    print(f"FP: ppl {fp.perplexity:.3f}", flush=True)
    for bits in args.bits:
        for name in args.methods:
            kw = dict(METHODS[name])
            if "cd_sweeps" in kw:
                kw["cd_sweeps"] = 30 if bits == 2 else 1
                if args.cd_damp is not None:
                    kw["cd_damp"] = args.cd_damp
            extra = {**overrides, **(magr_overrides if kw.get("magr") else {})}
            config = QuantConfig(bits=bits, group_size=args.group_size, **{**kw, **extra})
            model = copy.deepcopy(base)
            needs = config.method == "gptq" or config.magr or config.cd_sweeps
            t = time.perf_counter()
            quantize_model(
                model,
                calib if needs else None,
                config,
                calib_dtype=calib_dtype,
                product_dtype="calib" if args.products == "calib" else None,
                heldout_data=heldout if config.reconstruct else None,
            )
            quant_s = time.perf_counter() - t
            if args.save_dir is not None:
                from quantizers import save_quantized

                save_quantized(model, args.save_dir / f"w{bits}-{name}", tokenizer)
            t = time.perf_counter()
            ppl = perplexity(model, windows).perplexity
            row = {
                "method": name,
                "bits": bits,
                "ppl": ppl,
                "quant_s": quant_s,
                "eval_s": time.perf_counter() - t,
                "mean_rel_error": model.quantization_report.mean_rel_error(),
                "config": config.to_dict(),
            }
            report = model.quantization_report
            row["cholesky_fallbacks"] = {
                r.name: r.damp_percent for r in report.cholesky_fallbacks()
            }
            row["layers"] = len(report.layers)
            if report.reconstruction:
                row["reconstruction_s"] = report.reconstruction_seconds
                row["reconstruction"] = [dataclasses.asdict(r) for r in report.reconstruction]
            if report.e2e is not None:
                row["e2e"] = dataclasses.asdict(report.e2e)
            results["rows"].append(row)
            print(
                f"W{bits} {name}: ppl {ppl:.3f}, quantized in {quant_s:.0f} s"
                + (
                    f" (reconstruction {report.reconstruction_seconds:.0f} s)"
                    if report.reconstruction
                    else ""
                )
                + f"; Cholesky retries on {len(row['cholesky_fallbacks'])}/{row['layers']} layers",
                flush=True,
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
    print()
    print(markdown(results, args.group_size))


def calibration(args, tokenizer, model) -> tuple[list[torch.Tensor], list | None]:
    """The calibration windows (SVAMP questions, the tables so far, or qdiablo sources) and
    the held-out ones (None: quantize_model's fallback, the last quarter of the calibration)."""
    from qdiablo.calibration import build_calibration_data, heldout_windows

    if args.calib_source == ["svamp-questions"]:
        texts = math10k_texts("SVAMP", with_output=False)
        calib = tokenize_calibration(tokenizer, texts, args.calib_samples, args.calib_seq_len)
        return calib, None
    common = {"model": model, "seed": args.calib_seed, "cache_dir": args.calib_cache}
    calib = build_calibration_data(
        tokenizer, args.calib_source, args.calib_samples, args.calib_seq_len, **common
    )
    count = args.heldout_samples or max(1, args.calib_samples // 4)
    heldout = heldout_windows(
        tokenizer,
        args.calib_source,
        args.heldout_source,
        count,
        args.calib_samples,
        args.calib_seq_len,
        **common,
    )
    return calib, heldout


def parse_sets(items: list[str]) -> dict:
    """FIELD=VALUE strings -> {field: value}, values parsed as JSON when they parse."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def markdown(results: dict, group_size: int) -> str:
    rows = results["rows"]
    bits = sorted({r["bits"] for r in rows if r["bits"] < 32}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["bits"] < 32))
    head = "| method | " + " | ".join(f"W{b} g{group_size} ppl (quantize s)" for b in bits) + " |"
    lines = [head, "|---" * (len(bits) + 1) + "|"]
    fp = next(r for r in rows if r["bits"] == 32)
    lines.append(f"| {fp['method']} | " + " | ".join(f"{fp['ppl']:.2f}" for _ in bits) + " |")
    for m in methods:
        cells = []
        for b in bits:
            r = next((r for r in rows if r["method"] == m and r["bits"] == b), None)
            cells.append("—" if r is None else f"{r['ppl']:.2f} ({r['quant_s']:.0f} s)")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
