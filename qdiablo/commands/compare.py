"""`qdiablo compare config.yaml`: QLoRA / NF2-LoRA, GPTQ-LoRA and MagR-DiaBlo at 2 and 4 bits,
at matched and at the paper's budgets, on the same data and the same evaluation; resumable.

    qdiablo compare examples/compare-smollm2.yaml    # writes compare.md, .json and .png
"""

from __future__ import annotations

import argparse

HELP = "compare methods x bits x budgets (resumable): accuracy with intervals, McNemar, figure"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("grid", metavar="CONFIG.yaml", help="the comparison config (see README)")
    p.add_argument(
        "--force",
        action="append",
        default=None,
        metavar="STAGE",
        help="run this kind of stage (quantize, train, eval) or this stage key again, and the "
        "stages after it (repeatable)",
    )
    p.add_argument("--output", default=None, help="override the config's output folder")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh: remove this command's earlier outputs in the folder (only its "
        "own; other files there are kept)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="where every stage runs (quantize, train, eval, and export where it computes): "
        "auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N; default: the "
        "config's `device` key, else auto. A stage's own `device` key wins",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run the stages in this process (faster to start; by default each stage gets its "
        "own process, so that every training's peak memory is its own)",
    )


def run(args: argparse.Namespace) -> int:
    from qdiablo.pipeline.compare import run_compare  # deferred: the stages import torch

    run_compare(
        args.grid,
        force=args.force,
        output=args.output,
        isolate=not args.in_process,
        overwrite=args.overwrite,
        device=args.device,
    )
    return 0
