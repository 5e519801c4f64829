"""`qdiablo export`: the quantized base, the adapter, optionally the merged model, a model card
and a manifest, in one folder; `--verify` checks an export against its manifest.

qdiablo export --base runs/w2 --train-run runs/diablo-w2 --eval runs/eval/w2 --output out/w2
qdiablo export --base runs/w2 --adapter runs/diablo-w2/adapter --merged --output out/w2
qdiablo export --base runs/w4 --train-run runs/diablo-w4 --gguf --calib math.json --output out/w4
qdiablo export --base runs/w4 --train-run runs/diablo-w4 --serve marlin --calib math.json ...
qdiablo export --verify out/w2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qdiablo.calibration import add_calibration_arguments, check_calibration_arguments
from qdiablo.devices import add_device_argument
from qdiablo.errors import UserError
from quantizers.registry import METHOD_NAMES

HELP = "export a quantized base + adapter (optionally merged) with a model card and manifest"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The inputs, the folders to write (merged, serving), the re-quantization settings."""
    _add_input_arguments(p)
    _add_output_arguments(p)
    _add_requantize_arguments(p)


def _add_input_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", metavar="QUANTIZED_DIR", help="a folder written by `qdiablo quantize`")
    p.add_argument(
        "--adapter",
        metavar="ADAPTER_DIR",
        help="a DiaBlo adapter folder (or a PEFT LoRA one); default: TRAIN_DIR/adapter",
    )
    p.add_argument("--output", metavar="EXPORT_DIR", help="the export folder to write")
    p.add_argument(
        "--train-run",
        metavar="TRAIN_DIR",
        help="a `qdiablo train` output: its records go in the card",
    )
    p.add_argument(
        "--eval",
        metavar="EVAL_DIR",
        nargs="+",
        action="extend",
        help="`qdiablo eval` output folder(s): their scores go in the card",
    )


def _add_output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--merged",
        action="store_true",
        help="also write merged/: a plain HF model, adapter folded into the dequantized base",
    )
    p.add_argument(
        "--merged-dtype",
        choices=["float16", "bfloat16", "float32"],
        default="float16",
        help="dtype of merged/ (default float16)",
    )
    p.add_argument(
        "--requantize",
        action="store_true",
        help="also write merged-gptq/: merged/ re-quantized with MagR+GPTQ (implies --merged; "
        "changes the outputs; needs --calib)",
    )
    p.add_argument(
        "--serve",
        choices=["marlin"],
        help="also write marlin/: merged/ re-quantized (MagR+GPTQ, symmetric) for vLLM and "
        "SGLang's GPTQ-Marlin kernels (implies --merged; changes the outputs; needs --calib)",
    )
    p.add_argument(
        "--serve-bits", type=int, choices=[4, 8], default=4, help="marlin/: bits (default 4)"
    )
    p.add_argument(
        "--serve-group-size",
        type=int,
        choices=[128, 64, 32, -1],
        default=128,
        help="marlin/: group size (default 128; it must divide every layer's input size)",
    )
    p.add_argument(
        "--gguf",
        nargs="?",
        const="auto",
        choices=["auto", "q8_0", "f16"],
        help="also write gguf/ for llama.cpp and ollama (implies --merged). auto (the default): "
        "a 4-bit base whose groups tile 32 weights is re-quantized as it was (needs --calib) "
        "and written as exact Q4_1 / Q4_0 blocks; otherwise Q8_0 from the merged weights",
    )
    p.add_argument("--base-model-name", help="the original model's name, for the card")
    add_device_argument(p, "merging and re-quantizing run, one block at a time")
    p.add_argument(
        "--max-shard-size",
        type=shard_size,
        default="5GB",
        help="largest safetensors file of merged/ (e.g. 5GB, 500MB): the host holds one shard "
        "while writing it (default 5GB)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished export (only export's own files; yours are kept)",
    )
    p.add_argument(
        "--verify", metavar="EXPORT_DIR", help="check an export against its manifest.json and exit"
    )


def _add_requantize_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "re-quantization (--requantize, --gguf, --serve; default: the base's quantize_config; "
        "--serve marlin then sets its own bits, group size and symmetric grid)"
    )
    add_calibration_arguments(g, "calibration text: Math10K .json/.jsonl or text")
    g.add_argument("--method", choices=METHOD_NAMES, help="quantizer")
    g.add_argument("--bits", type=int, choices=[2, 3, 4, 8], help="bits per weight")
    g.add_argument("--group-size", type=int, help="-1 (per channel) or a power of two >= 16")
    g.add_argument("--sym", action=argparse.BooleanOptionalAction, help="symmetric grid")
    g.add_argument("--desc-act", action=argparse.BooleanOptionalAction, help="GPTQ act-order")
    g.add_argument("--magr", action=argparse.BooleanOptionalAction, help="MagR first")
    g.add_argument("--magr-alpha", type=float, help="MagR α")
    g.add_argument("--magr-iters", type=int, help="MagR iterations")
    g.add_argument("--cd-sweeps", type=int, help="coordinate-descent sweeps")
    g.add_argument(
        "--reconstruct",
        action=argparse.BooleanOptionalAction,
        help="block-wise reconstruction (default: as the base was quantized)",
    )
    g.add_argument("--checkpoint-format", choices=["gptq", "gptq_v2"], help="zero-point convention")


def shard_size(text: str) -> int:
    """'5GB', '500MB', '2e9' → bytes (decimal units, as transformers' max_shard_size)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    value = str(text).strip().upper()
    scale = next((units[u] for u in units if value.endswith(u)), 1)
    try:
        size = int(float(value.removesuffix("B")[:-1] if scale > 1 else value) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    return size


QUANT_FLAGS = (
    "method",
    "bits",
    "group_size",
    "sym",
    "desc_act",
    "magr",
    "magr_alpha",
    "magr_iters",
    "cd_sweeps",
    "reconstruct",
    "checkpoint_format",
)


def run(args: argparse.Namespace) -> int:
    from qdiablo.export import export_model, verify_export  # deferred: torch, transformers
    from qdiablo.export.serving import ServeOptions

    if args.verify:
        manifest = verify_export(args.verify)
        print(f"{args.verify}: {len(manifest['files'])} files match manifest.json")
        return 0
    if not args.base or not args.output:
        raise UserError("--base and --output are required (or --verify EXPORT_DIR)")
    check_calibration_arguments(args)
    overrides = {k: getattr(args, k) for k in QUANT_FLAGS if getattr(args, k) is not None}
    if overrides and not (args.requantize or args.gguf or args.serve):
        flags = ", ".join("--" + k.replace("_", "-") for k in overrides)
        raise UserError(f"{flags} only apply with --requantize, --gguf or --serve")
    out = export_model(
        args.base,
        args.adapter,
        args.output,
        train_run=args.train_run,
        evals=args.eval or (),
        merged=args.merged,
        merged_dtype=args.merged_dtype,
        requantize_merged=args.requantize,
        calib=args.calib,
        calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len,
        calib_batch_size=args.calib_batch_size,
        quant_overrides=overrides,
        base_name=args.base_model_name,
        overwrite=args.overwrite,
        device=args.device,
        max_shard_size=args.max_shard_size,
        serve=ServeOptions(
            marlin=args.serve == "marlin",
            marlin_bits=args.serve_bits,
            marlin_group_size=args.serve_group_size,
            gguf=args.gguf,
        ),
    )
    parts = sorted(p.name for p in Path(out).iterdir() if p.is_dir())
    print(f"exported {', '.join(parts)} to {out} (see {Path(out) / 'README.md'})")
    return 0
