"""Training adapters on frozen (packed) bases with Hugging Face Trainer: DiaBlo and the baselines.

    from qdiablo.train import TrainConfig, train
    result = train(TrainConfig(base="nf4", adapter="diablo", num_blocks=64, output="runs/x"))

Modules: `config` (TrainConfig), `bases` (fp/gptq/rtn/nf4/nf2), `setup` (the adapter attached
through `qdiablo.adapters.registry` on its budget, trained scales, the teacher), `dataset`,
`trainer` (Trainer setup, adapter-only checkpoints), `checkpoint`, `metrics` (throughput,
memory), `distill`, `fsdp` and `fsdp_loading`, `run` (the run itself).
`train` and `TrainResult` are imported lazily, so that `qdiablo --help` stays light.
"""

from qdiablo.train.config import TrainConfig

__all__ = ["TrainConfig", "TrainResult", "train"]


def __getattr__(name: str):
    if name in ("train", "TrainResult"):
        from qdiablo.train import run

        return getattr(run, name)
    raise AttributeError(f"module 'qdiablo.train' has no attribute {name!r}")
