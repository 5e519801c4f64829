"""A run's model before training: the base loaded, the adapter attached on its budget (through
the adapter registry), the trained scales and the distillation teacher, FSDP's sharded loader,
and the run's first lines."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

from qdiablo.adapters.budget import Budget, resolve_budget
from qdiablo.adapters.common import adapted_layers, layer_shapes, trainable_parameters
from qdiablo.adapters.registry import get_adapter
from qdiablo.adapters.scales import enable_scale_training
from qdiablo.diablo.targets import resolve_target_modules
from qdiablo.errors import UserError
from qdiablo.train.bases import LoadedBase, load_training_base
from qdiablo.train.config import TrainConfig
from qdiablo.train.fsdp_loading import file_state_of, shard_and_load
from qdiablo.train.runtime import Runtime


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    if is_main_process():
        print(message, flush=True)


def attach_adapter(loaded: LoadedBase, config: TrainConfig) -> tuple[Any, Budget, dict | None]:
    """Settle the budget on the base's target layers and attach the adapter.

    Returns the adapter model, the budget, and the other method at the matched setting."""
    method = get_adapter(config.adapter)
    # Every method adapts the same layers: the architecture's default when none are given.
    targets = resolve_target_modules(loaded.model, config.target_spec)
    layers = adapted_layers(loaded.model, targets)
    shapes = layer_shapes(layers)
    method.check({layer.name: (layer.in_features, layer.out_features) for layer in layers}, config)
    budget = resolve_budget(
        shapes, method.setting, config.num_blocks, config.rank, config.match_params
    )
    expected = method.trainable_count(shapes, budget)
    model = method.attach(loaded.model, targets, budget, config)
    actual = trainable_parameters(model)
    if actual != expected:
        raise RuntimeError(f"trainable parameters {actual:,} differ from the budget {expected:,}")
    return model, budget, method.matched(budget, shapes)


def load_teacher(config: TrainConfig, loaded: LoadedBase):
    """The full-precision teacher for --distill: frozen, in eval mode, on the student's device,
    with the student's vocabulary."""
    from qdiablo.models import load_base

    student = next(p for p in loaded.model.parameters())
    teacher = load_base(config.distill, "fp", dtype=config.dtype, device=student.device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    sizes = (
        teacher.get_output_embeddings().weight.shape[0],
        loaded.model.get_output_embeddings().weight.shape[0],
    )
    if sizes[0] != sizes[1]:
        raise UserError(
            f"--distill {config.distill}: its vocabulary ({sizes[0]}) is not the student's "
            f"({sizes[1]})",
            hint="distil from the full-precision model the base was quantized from",
        )
    return teacher


def sharded_loader(loaded: LoadedBase, model, config: TrainConfig):
    """FSDP's sharded loading: the base is still on meta, and each process will read only its
    shards; a base fingerprint comes from the few file rows it samples."""
    state_of = file_state_of(loaded.model, loaded.model._qdiablo_files)
    get_adapter(config.adapter).fingerprint_from_files(model, state_of)
    return functools.partial(shard_and_load, base=loaded.model, seed=config.seed)


def announce(config, loaded, runtime, budget, other, own_count: int) -> None:
    """The run's first lines: the base, where and how it computes, the adapter and its count."""
    method = get_adapter(config.adapter)
    own = method.describe(budget.num_blocks, budget.rank)
    same = ""
    if other is not None:
        count = other["trainable_parameters"]
        matched = get_adapter(other["adapter"])
        setting = matched.describe(other.get("num_blocks"), other.get("rank"))
        same = f" ({matched.title} at the matched {setting}: "
        same += f"{f'{count:,}' if count is not None else 'n/a'})"
    say(f"base: {loaded.description} ({config.base})")
    say(
        f"on {runtime.device}: {config.precision} compute, {config.dtype} float weights, "
        f"gradient checkpointing {'on' if config.gradient_checkpointing else 'off'}"
    )
    say(
        f"adapter: {config.adapter} {own} on {budget.num_layers} layers: {own_count:,} trainable "
        f"parameters{same}"
    )


@dataclass
class RunSetup:
    """A run's model before training: the base, the adapter on it and what goes with it."""

    loaded: LoadedBase
    model: Any
    budget: Budget
    other: dict | None
    load_shards: Any  # FSDP's sharded loading, or None
    scale_count: int  # trained scale multipliers (--train-scales)
    teacher: Any  # the --distill teacher, or None
    own_count: int


def set_up(
    config: TrainConfig, base: LoadedBase | None, runtime: Runtime, sharded_loading: bool
) -> RunSetup:
    """Load the base (unless given), attach the adapter, its trained scales and the teacher."""
    loaded = base or load_training_base(
        config.base,
        config.model,
        config.gguf_file,
        config.dtype,
        device="meta" if sharded_loading else runtime.device,
        packed_storage=config.packed_storage,
    )
    model, budget, other = attach_adapter(loaded, config)
    load_shards = sharded_loader(loaded, model, config) if sharded_loading else None
    scale_count = enable_scale_training(model) if config.train_scales else 0
    teacher = load_teacher(config, loaded) if config.distill else None
    own_count = trainable_parameters(model)
    announce(config, loaded, runtime, budget, other, own_count)
    if scale_count:
        say(f"trained scales: {scale_count:,} per-group multipliers at lr {config.scale_lr:g}")
    if teacher is not None:
        say(f"distillation: KL to {config.distill} (weight {config.distill_weight:g})")
    return RunSetup(loaded, model, budget, other, load_shards, scale_count, teacher, own_count)
