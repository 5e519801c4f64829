"""`qdiablo run config.yaml`: quantize -> train -> eval -> export in one go, resumable.

qdiablo run examples/pipeline.yaml              # a re-run skips the stages that are done
qdiablo run examples/pipeline.yaml --force train    # train again, and eval/export after it
"""

from __future__ import annotations

import argparse

HELP = "run quantize -> train -> eval -> export from one YAML config (resumable)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", metavar="CONFIG.yaml", help="the pipeline config (see README)")
    p.add_argument(
        "--force",
        action="append",
        default=None,
        metavar="STAGE",
        help="run this stage (quantize, train, eval, export) again even if it is up to date; "
        "the stages after it follow (repeatable)",
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
        "--isolate",
        action="store_true",
        help="run each stage in its own process (its own peak memory; default: this process)",
    )


def run(args: argparse.Namespace) -> int:
    from qdiablo.pipeline.run import run_pipeline  # deferred: the stages import torch

    run_pipeline(
        args.pipeline,
        force=args.force,
        output=args.output,
        isolate=args.isolate,
        overwrite=args.overwrite,
        device=args.device,
    )
    return 0
