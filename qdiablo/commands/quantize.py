"""`qdiablo quantize`: MagR + GPTQ/RTN on a causal LM's decoder blocks, saved in the GPTQ layout.

qdiablo quantize --model smollm2 --bits 3 --group-size 64 --magr --output runs/smollm2-w3
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from pathlib import Path

from qdiablo.calibration import add_calibration_arguments
from qdiablo.devices import add_device_argument
from qdiablo.errors import UserError
from qdiablo.flags import add_dataclass_arguments
from quantizers.config import QuantConfig

HELP = "quantize a model (MagR, GPTQ or RTN at 2/3/4/8 bits) and save it in the GPTQ layout"

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The model, output and calibration flags, then one flag per QuantConfig field."""
    p.add_argument(
        "--model",
        required=True,
        help="hub id, local folder, or 'smollm2' for the embedded SmolLM2-135M-Instruct",
    )
    p.add_argument("--gguf-file", help="GGUF file inside --model's folder to load from")
    p.add_argument("--output", required=True, help="folder to write the quantized model to")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished quantize output, or write into a folder holding other files "
        "(only quantize's own files are replaced; yours are kept)",
    )
    add_dataclass_arguments(p, QuantConfig, group="quantizer (QuantConfig)")
    add_calibration_arguments(
        p,
        "calibration source(s): math10k (the Math10K subset shipped with qdiablo, "
        "decontaminated; the default), generated (text sampled from the model itself, seeded "
        "and cached), a .json/.jsonl Math10K file or a plain-text file; several share the "
        "windows",
        heldout=True,
    )
    p.add_argument(
        "--calib-dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="dtype of the calibration forward passes: auto = the GPU's compute dtype "
        "(bfloat16), or on the CPU bfloat16 where the hardware has it (about 3x faster), else "
        "the model's dtype; weights are always quantized in full precision",
    )
    p.add_argument(
        "--calib-offload",
        action="store_true",
        help="keep the calibration activations in host memory, each batch moved to the device "
        "when used: the device then holds one block and its Hessians (slower on a GPU)",
    )
    add_device_argument(p, "each decoder block is quantized")
    p.add_argument(
        "--dtype",
        default="auto",
        help="dtype of the model's weights while quantizing, and of the embeddings, norms and "
        "head saved: auto = float32 on the CPU, the checkpoint's own dtype on a GPU "
        "(the quantized layers are always computed from the weights in float32)",
    )


def quant_config_from_args(args: argparse.Namespace) -> QuantConfig:
    """The QuantConfig the flags describe; invalid combinations are a UserError."""
    try:
        return QuantConfig(
            **{f.name: getattr(args, f.name) for f in dataclasses.fields(QuantConfig)}
        )
    except ValueError as e:
        message = re.sub(
            r"QuantConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e)
        )
        raise UserError(message, hint="run `qdiablo quantize --help` for the options") from e


# What `qdiablo quantize` writes at the top of its folder (save_quantized: weights, configs,
# report, tokenizer files): a file of the user's under one of these names is never written over.
QUANTIZE_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "quantize_config.json",
    "quantization_report.json",
    "quantization_report.md",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def calibration_for(args: argparse.Namespace, config: QuantConfig, tokenizer, model):
    """The calibration batches and (with reconstruction) the held-out batches the flags ask
    for; (None, None) when the method needs no data and none was given."""
    from qdiablo.calibration import build_calibration_data, default_cache_dir, heldout_windows
    from quantizers.quantize import needs_calibration

    if not (needs_calibration(config) or args.calib):
        return None, None
    common = {
        "model": model,
        "seed": args.calib_seed,
        "cache_dir": Path(args.calib_cache) if args.calib_cache else default_cache_dir(args.output),
    }
    calib = build_calibration_data(
        tokenizer,
        args.calib,
        num_samples=args.calib_samples,
        seq_len=args.calib_seq_len,
        batch_size=args.calib_batch_size,
        **common,
    )
    heldout = None
    if config.reconstruct and config.recon_holdout > 0:
        count = args.recon_heldout_samples or max(
            1, round(config.recon_holdout * args.calib_samples)
        )
        heldout = heldout_windows(
            tokenizer,
            args.calib,
            args.recon_heldout,
            count,
            args.calib_samples,
            args.calib_seq_len,
            args.calib_batch_size,
            **common,
        )
    return calib, heldout


def run(args: argparse.Namespace) -> int:
    # Deferred to keep `qdiablo --help` fast: these import torch, transformers and the quantizers.
    from qdiablo.calibration import check_calibration_arguments, check_reconstruction_windows
    from qdiablo.devices import resolve_device
    from qdiablo.faults import guard
    from qdiablo.inputs import check_apart
    from qdiablo.models import load_tokenizer
    from qdiablo.outputs import OutputFolder
    from quantizers import quantize_model, save_quantized
    from quantizers.resume import PARTIAL_DIR, BlockStore, ResumeMismatch

    config = quant_config_from_args(args)
    check_calibration_arguments(args)
    check_reconstruction_windows(config, args.calib_samples)
    device = resolve_device(args.device)
    output = Path(args.output)
    check_apart(output, {"--model": args.model, "--calib": args.calib})
    with OutputFolder(output, "quantize", overwrite=args.overwrite, known=QUANTIZE_NAMES) as out:
        tokenizer = load_tokenizer(args.model, args.gguf_file)
        model, load_block, source = _open_model(args, device)
        calib, heldout = calibration_for(args, config, tokenizer, model)
        out.claim([PARTIAL_DIR])  # finished blocks, kept until the folder is whole
        store = BlockStore(output / PARTIAL_DIR, {"model": source}, discard=args.overwrite)
        try:
            quantize_model(
                model,
                calib,
                config,
                device=device,
                calib_dtype=_calib_dtype(args.calib_dtype, device),
                heldout_data=heldout,
                load_block=load_block,
                offload=args.calib_offload,
                act_dtype="calib" if device.type == "cuda" else None,
                store=store,
            )
        except ResumeMismatch as e:
            raise UserError(
                str(e),
                hint="run it with the same settings to resume, choose another --output, or "
                "pass --overwrite to discard that work",
            ) from e
        with guard(output):
            save_quantized(model, output, tokenizer, claim=out.claim)
            store.remove()
            out.unclaim([PARTIAL_DIR])
            out.finish()
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


def _calib_dtype(name: str, device):
    """--calib-dtype as quantize_model takes it: on a GPU, auto is the device's compute dtype."""
    import torch

    from qdiablo.devices import default_compute_dtype

    if name == "auto" and device.type == "cuda":
        return default_compute_dtype(device)
    return {"auto": "auto", "float32": None, "bfloat16": torch.bfloat16}[name]


def _open_model(args: argparse.Namespace, device):
    """(model, load_block, source fingerprint): the model with its blocks read one at a time
    from the shards when it can be (qdiablo.streamed), else loaded whole (also when the
    calibration text is generated by the model, which samples from all of it)."""
    from qdiablo.models import load_base
    from qdiablo.sources import parse_dtype
    from qdiablo.streamed import checkpoint_dtype, open_streamed, source_fingerprint

    if args.dtype != "auto":
        dtype = parse_dtype(args.dtype)
    elif device.type == "cpu":
        dtype = parse_dtype("float32")
    else:
        dtype = checkpoint_dtype(args.model, args.gguf_file, device)
    generated = "generated" in map(str, [*(args.calib or []), *(args.recon_heldout or [])])
    if generated:  # sampling needs the whole model (a streamed one has its blocks on meta)
        log.info("calibration text generated by the model: the model is loaded whole")
    streamed = None if generated else open_streamed(args.model, args.gguf_file, dtype)
    if streamed is not None:
        return streamed.model, streamed.load_block, streamed.fingerprint()
    model = load_base(args.model, "fp", gguf_file=args.gguf_file, dtype=dtype)
    return model, None, {**source_fingerprint(args.model, args.gguf_file), "dtype": str(dtype)}
