"""`qdiablo demo`: the whole pipeline on the embedded SmolLM2-135M-Instruct, offline.

MagR + GPTQ at 2 bits with block-wise reconstruction and its end-to-end stage -> evaluate the
un-tuned quantized base -> train DiaBlo blocks on the shipped real Math10K records
(decontaminated against the evaluated sets), distilled from the full-precision model -> evaluate
again -> export (GPTQ-layout base +
adapter + model card + sha256 manifest), then a table of the two evaluations side by side. It
runs on the `qdiablo run` stage machinery, so an interrupted demo resumes where it stopped. Each
stage runs in its own process (its memory is returned when it ends, and its peak RSS is its own)
with a fixed torch thread count (`--threads`, default the cores this process may use), so two
runs on one machine with the same count print the same figures. Reconstruction is most of the
quantize stage (`--no-reconstruct` skips it: a worse base, a faster demo); `--full` drops the
size limits (all calibration samples, every training record for 3 epochs, the full test sets).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from qdiablo.devices import add_device_argument
from qdiablo.errors import UserError
from qdiablo.io import read_json

HELP = "the whole pipeline (2-bit MagR+GPTQ, DiaBlo, eval, export) on SmolLM2, offline"

log = logging.getLogger("qdiablo.demo")

TASKS = ["gsm8k", "SVAMP", "mawps", "AQuA"]
STAGES = ["quantize", "eval-base", "train", "eval", "export"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="hub id, local folder, or 'smollm2'")
    p.add_argument("--output", default="runs/demo", help="folder for every stage's outputs")
    p.add_argument("--bits", type=int, default=2, choices=[2, 3, 4], help="GPTQ bits")
    p.add_argument("--num-blocks", type=int, default=64, help="DiaBlo blocks per layer (N)")
    p.add_argument(
        "--calib-samples",
        type=int,
        default=48,
        help="calibration windows of 256 tokens (the quantizer's default is 64; 48 keeps the "
        "demo within 15 minutes on 2 cores)",
    )
    p.add_argument(
        "--no-reconstruct",
        dest="reconstruct",
        action="store_false",
        help="skip block-wise reconstruction of the 2-bit base (a third of the demo's time; at 2 "
        "bits it lowered the fine-tuned reference NLL from 3.16 to 2.49 in BENCHMARKS.md)",
    )
    p.add_argument("--recon-steps", type=int, default=None, help="reconstruction steps per block")
    p.add_argument(
        "--recon-epochs",
        type=float,
        default=1.0,
        help="reconstruction epochs over the calibration windows (the quantizer's default is 4, "
        "of which early stopping runs about half; the demo's 1 halves that stage's time)",
    )
    p.add_argument(
        "--recon-e2e-epochs",
        type=float,
        default=1.0,
        help="epochs of reconstruction's end-to-end stage (the quantizer's default is 2; 0 skips "
        "it)",
    )
    p.add_argument(
        "--train-scales",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="train the base's scales with the DiaBlo blocks",
    )
    p.add_argument(
        "--distill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="distil from the full-precision model (KL) instead of the plain LM loss (on by "
        "default: with the plain loss the NLL of MAWPS's bare-answer references rose after "
        "training; --no-distill trains on the plain loss)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=20,
        help="training steps of 8 (20: a distillation step costs ~1.5 plain ones here, so 20 "
        "keeps the demo within 15 minutes)",
    )
    p.add_argument("--limit", type=int, default=8, help="evaluated items per test set")
    p.add_argument("--max-new-tokens", type=int, default=160, help="generation budget per answer")
    p.add_argument(
        "--full",
        action="store_true",
        help="drop the size limits: 128 calibration windows, 3 epochs over every training "
        "record, full test sets, 256 new tokens (hours on a CPU)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for every stage (default: the cores this process may use; the "
        "same count gives the same figures run to run, another may change the last digits: "
        "float sums are reduced in a thread-dependent order)",
    )
    add_device_argument(p, "every stage runs")
    p.add_argument(
        "--force",
        nargs="+",
        default=[],
        choices=STAGES,
        help="re-run these stages and what follows",
    )


def stage_settings(args: argparse.Namespace) -> dict[str, dict]:
    """Each stage's `qdiablo <verb>` flags: the demo's budget, or none with --full."""
    from quantizers.magr import fast_matmul_dtype  # deferred: torch, off the `--help` path

    quantize = {
        "method": "gptq",
        "bits": args.bits,
        "group_size": 64,
        "magr": True,
        "calib_samples": 128 if args.full else args.calib_samples,
        "calib_seq_len": 256,
        "reconstruct": args.reconstruct,
    }
    if args.reconstruct and args.recon_steps is not None:
        quantize["recon_steps"] = args.recon_steps
    if args.reconstruct and not args.full:
        quantize["recon_epochs"] = args.recon_epochs
        quantize["recon_e2e_epochs"] = args.recon_e2e_epochs
    train = {
        "adapter": "diablo",
        "num_blocks": args.num_blocks,
        "decontaminate": TASKS,
        "max_length": 256 if not args.full else 512,
        "batch_size": 8 if not args.full else 16,
        "progress": True,
        # Without it the activations kept for backward (30 layers, batch 8 x 256 tokens) took the
        # stage to a 6.3 GB peak RSS; recomputing them costs some time and keeps the peak lower.
        "gradient_checkpointing": True,
        # bf16 autocast where the CPU multiplies bf16 natively (the adapter stays fp32)
        "precision": "bf16" if fast_matmul_dtype("cpu") is not None else "fp32",
        "train_scales": args.train_scales,
    }
    if args.distill:
        train["distill"] = args.model
    if not args.full:
        train["max_steps"] = args.steps
    evaluate = {
        "tasks": TASKS,
        "max_new_tokens": 256 if args.full else args.max_new_tokens,
        "batch_size": 8,
    }
    if not args.full:
        evaluate["limit"] = args.limit
    return {"quantize": quantize, "train": train, "eval": evaluate, "export": {}}


def run(args: argparse.Namespace) -> int:
    # Deferred to keep `qdiablo --help` fast: the pipeline's stages import torch when they run.
    from qdiablo.pipeline.run import eval_stage, export_stage, quantize_stage, train_stage
    from qdiablo.pipeline.stages import Runner, summary_table

    if args.threads is None:
        args.threads = available_cores()
    for flag in ("threads", "recon_steps", "steps", "limit", "calib_samples"):
        value = getattr(args, flag)
        if value is not None and value < 1:  # before any stage writes into the output folder
            raise UserError(f"--{flag.replace('_', '-')} {value}: must be at least 1")
    if args.reconstruct and not args.full and args.calib_samples < 2:
        raise UserError(
            f"--calib-samples {args.calib_samples}: reconstruction needs at least 2 calibration "
            "windows (it holds some out to measure itself)",
            hint="raise --calib-samples, or pass --no-reconstruct",
        )
    start = time.time()
    root = Path(args.output)
    s = stage_settings(args)
    q = quantize_stage("quantize", args.model, s["quantize"], root / "quantized", "demo")
    base_eval = eval_stage("eval-base", q, None, args.model, s["eval"], root / "eval-base", "demo")
    train = train_stage("train", q, args.model, s["train"], root / "train", "demo")
    tuned_eval = eval_stage("eval", q, train, args.model, s["eval"], root / "eval", "demo")
    export = export_stage("export", q, train, [tuned_eval], s["export"], root / "export", "demo")
    stages = [q, base_eval, train, tuned_eval, export]
    print(
        f"qdiablo demo: {args.model}, MagR+GPTQ {args.bits}-bit"
        f"{' + reconstruction' if args.reconstruct else ''} -> DiaBlo N={args.num_blocks} "
        f"-> Math10K eval ({'full sets' if args.full else f'first {args.limit} items per set'}) "
        f"-> export, under {root}/ ({args.threads} thread{'s' if args.threads > 1 else ''}, "
        f"device {args.device})"
    )
    runner = Runner(
        root, args.force, isolate=True, verb="demo", threads=args.threads, device=args.device
    )
    outcomes = runner.run(stages)
    print(summary_table(outcomes))
    print(comparison_table(root / "eval-base", root / "eval"))
    print(f"\nexported to {root / 'export'} (load it with qdiablo.export.load_exported)")
    print(f"demo finished in {time.time() - start:.0f} s")
    return 0


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; the machine's count where the
    platform has no affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def comparison_table(base_dir: Path, tuned_dir: Path) -> str:
    """Markdown: per task, the un-tuned quantized base against base + DiaBlo."""
    base = read_json(base_dir / "summary.json", what="evaluation summary")
    tuned = read_json(tuned_dir / "summary.json", what="evaluation summary")

    def cell(t: dict) -> str:
        return f"{t['accuracy']:.1f}% ({t['correct']}/{t['n']})"

    lines = [
        "",
        "| task | quantized base | + DiaBlo | NLL base | NLL + DiaBlo |",
        "|---|---|---|---|---|",
    ]
    names = [n for n in TASKS if n in base["tasks"]] + [n for n in base["tasks"] if n not in TASKS]
    for name in names:
        b, t = base["tasks"][name], tuned["tasks"][name]
        lines.append(f"| {name} | {cell(b)} | {cell(t)} | {b['nll']:.4f} | {t['nll']:.4f} |")
    bm, tm = base.get("mean") or {}, tuned.get("mean") or {}
    if bm.get("accuracy") is not None:
        lines.append(f"| mean | {bm['accuracy']:.1f}% | {tm['accuracy']:.1f}% | | |")
    return "\n".join(lines)
