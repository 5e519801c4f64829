"""`qdiablo train`: train a DiaBlo or LoRA adapter on a frozen fp / gptq / rtn / nf4 / nf2 base.

Examples:

    qdiablo train --base nf4 --adapter diablo --num-blocks 64 --output runs/diablo-nf4
    qdiablo train --base nf4 --adapter lora --num-blocks 64 --match-params --output runs/qlora
    accelerate launch --multi_gpu --num_processes 2 -m qdiablo train --batch-size 16 ...
"""

from __future__ import annotations

import argparse

HELP = "train a DiaBlo or LoRA adapter on a frozen fp / gptq / rtn / nf4 / nf2 base"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qdiablo.train.config import add_config_arguments

    add_config_arguments(p)


def run(args: argparse.Namespace) -> int:
    from qdiablo.train import TrainConfig, train

    train(TrainConfig.from_args(args))
    return 0
