"""`qdiablo train`: train a DiaBlo or LoRA adapter on a frozen fp / gptq / rtn / nf4 / nf2 base.

Examples:

    qdiablo train --base nf4 --adapter diablo --num-blocks 64 --output runs/diablo-nf4
    qdiablo train --base nf4 --adapter lora --num-blocks 64 --match-params --output runs/qlora
    accelerate launch --multi_gpu --num_processes 2 -m qdiablo train --batch-size 16 ...
"""

from __future__ import annotations

import argparse

from qdiablo.flags import add_dataclass_arguments
from qdiablo.train.config import TrainConfig

HELP = "train a DiaBlo or LoRA adapter on a frozen fp / gptq / rtn / nf4 / nf2 base"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (its help, default and choices)."""
    add_dataclass_arguments(p, TrainConfig)


def run(args: argparse.Namespace) -> int:
    from qdiablo.train.run import train  # deferred: transformers' Trainer takes seconds to import

    train(TrainConfig.from_args(args))
    return 0
