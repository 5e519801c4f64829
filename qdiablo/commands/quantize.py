"""`qdiablo quantize`: MagR + GPTQ/RTN on a causal LM's decoder blocks, saved in the GPTQ layout.

qdiablo quantize --model smollm2 --bits 3 --group-size 64 --magr --output runs/smollm2-w3
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from qdiablo.errors import UserError

HELP = "quantize a model (MagR, GPTQ or RTN at 2/3/4/8 bits) and save it in the GPTQ layout"

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qdiablo.calibration import add_calibration_arguments

    p.add_argument(
        "--model",
        required=True,
        help="hub id, local folder, or 'smollm2' for the embedded SmolLM2-135M-Instruct",
    )
    p.add_argument("--gguf-file", help="GGUF file inside --model's folder to load from")
    p.add_argument("--output", required=True, help="folder to write the quantized model to")
    p.add_argument("--method", choices=["gptq", "rtn"], default="gptq", help="quantizer")
    p.add_argument("--bits", type=int, choices=[2, 3, 4, 8], default=4, help="bits per weight")
    p.add_argument(
        "--group-size",
        type=int,
        default=128,
        help="columns per scale/zero: -1 (per channel) or a power of two >= 16 (default 128)",
    )
    p.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    p.add_argument("--desc-act", action="store_true", help="GPTQ act-order")
    p.add_argument("--static-groups", action="store_true", help="GPTQ static group grids")
    p.add_argument(
        "--no-true-sequential",
        dest="true_sequential",
        action="store_false",
        help="take every layer's inputs from the unquantized block (default: q,k,v -> o -> "
        "gate,up -> down, each on already-quantized inputs)",
    )
    p.add_argument("--damp-percent", type=float, default=0.01, help="GPTQ damping (default 0.01)")
    p.add_argument(
        "--cd-sweeps", type=int, default=0, help="coordinate-descent sweeps after quantizing"
    )
    p.add_argument(
        "--cd-damp", type=float, default=0.01, help="coordinate-descent damping (reference 0.75)"
    )
    p.add_argument("--magr", action="store_true", help="MagR magnitude reduction first")
    p.add_argument(
        "--magr-alpha", type=float, help="MagR α (default 1e-3 per channel, 1e-4 grouped)"
    )
    p.add_argument("--magr-iters", type=int, default=50, help="MagR iterations (default 50)")
    p.add_argument("--magr-solver", choices=["fista", "plain"], default="fista", help="MagR solver")
    p.add_argument(
        "--beta", type=float, help="scale shrink in (0, 1] (default: MagR's table with --magr)"
    )
    p.add_argument(
        "--checkpoint-format",
        choices=["gptq", "gptq_v2"],
        default="gptq_v2",
        help="zero-point convention: gptq_v2 (GPTQModel's format, the default) or gptq (v1, "
        "zero-1; GPTQModel loads it only when symmetric)",
    )
    p.add_argument(
        "--reconstruct",
        action="store_true",
        help="block-wise reconstruction after GPTQ/RTN: train each block's codes and scales "
        "against the full-precision block's outputs (same packed layout)",
    )
    p.add_argument(
        "--recon-steps", type=int, default=60, help="reconstruction: Adam steps per block"
    )
    p.add_argument(
        "--recon-lr-code", type=float, default=1e-2, help="reconstruction: code latent lr"
    )
    p.add_argument(
        "--recon-lr-scale", type=float, default=1e-3, help="reconstruction: scale multiplier lr"
    )
    p.add_argument(
        "--recon-params",
        choices=["scales+codes", "scales", "codes"],
        default="scales+codes",
        help="reconstruction: what is trained",
    )
    p.add_argument(
        "--recon-holdout",
        type=float,
        default=0.25,
        help="reconstruction: share of calibration windows held out (early stopping, report)",
    )
    p.add_argument(
        "--recon-eval-every",
        type=int,
        default=10,
        help="reconstruction: steps between held-out evaluations",
    )
    add_calibration_arguments(
        p,
        "calibration text: a .json/.jsonl Math10K file or a plain-text file "
        "(default: the Math10K subset shipped with qdiablo)",
    )
    p.add_argument(
        "--calib-dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="dtype of the calibration forward passes: auto = bfloat16 where the hardware has "
        "it (about 3x faster on CPU), else the model's dtype; weights are always quantized in "
        "full precision",
    )
    p.add_argument("--device", help="where each block is quantized (default: cpu)")
    p.add_argument("--dtype", default="float32", help="dtype to load the model in")


def quant_config_from_args(args: argparse.Namespace):
    """The QuantConfig the flags describe; invalid combinations are a UserError."""
    from quantizers import QuantConfig

    try:
        return QuantConfig(
            method=args.method,
            bits=args.bits,
            group_size=args.group_size,
            sym=args.sym,
            desc_act=args.desc_act,
            static_groups=args.static_groups,
            true_sequential=args.true_sequential,
            damp_percent=args.damp_percent,
            cd_sweeps=args.cd_sweeps,
            cd_damp=args.cd_damp,
            magr=args.magr,
            magr_alpha=args.magr_alpha,
            magr_iters=args.magr_iters,
            magr_solver=args.magr_solver,
            beta=args.beta,
            checkpoint_format=args.checkpoint_format,
            reconstruct=args.reconstruct,
            recon_steps=args.recon_steps,
            recon_lr_code=args.recon_lr_code,
            recon_lr_scale=args.recon_lr_scale,
            recon_params=args.recon_params,
            recon_holdout=args.recon_holdout,
            recon_eval_every=args.recon_eval_every,
        )
    except ValueError as e:
        message = re.sub(
            r"QuantConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e)
        )
        raise UserError(message, hint="run `qdiablo quantize --help` for the options") from e


def run(args: argparse.Namespace) -> int:
    import torch

    from qdiablo.calibration import build_calibration_data
    from qdiablo.models import load_model, load_tokenizer
    from quantizers import quantize_model, save_quantized

    config = quant_config_from_args(args)
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} exists and is not a folder")
    tokenizer = load_tokenizer(args.model, args.gguf_file)
    needs_data = (
        config.method == "gptq" or config.magr or config.cd_sweeps > 0 or config.reconstruct
    )
    calib = None
    if needs_data or args.calib:
        calib = build_calibration_data(
            tokenizer,
            args.calib,
            num_samples=args.calib_samples,
            seq_len=args.calib_seq_len,
            batch_size=args.calib_batch_size,
        )
    model = load_model(args.model, args.gguf_file, dtype=args.dtype)
    calib_dtype = {"auto": "auto", "float32": None, "bfloat16": torch.bfloat16}[args.calib_dtype]
    quantize_model(model, calib, config, device=args.device, calib_dtype=calib_dtype)
    save_quantized(model, output, tokenizer)
    report = model.quantization_report
    mean = report.mean_rel_error()
    print(
        f"quantized {len(report.layers)} layers to {config.bits} bits "
        f"(group size {config.group_size}, {config.method}{' + MagR' if config.magr else ''}"
        f"{' + reconstruction' if config.reconstruct else ''}) "
        f"in {report.seconds:.0f} s"
        + ("" if mean is None else f"; mean relative output error {mean:.4f}")
    )
    if report.reconstruction:
        kept = [r for r in report.reconstruction if r.kept]
        print(
            f"reconstruction: {len(kept)} of {len(report.reconstruction)} blocks improved on "
            f"{report.heldout_windows} held-out windows, in {report.reconstruction_seconds:.0f} s"
        )
    retried = report.cholesky_fallbacks()
    if retried:
        print(
            f"GPTQ's Cholesky needed more damping on {len(retried)} of {len(report.layers)} layers"
        )
    print(f"saved to {output}")
    return 0
