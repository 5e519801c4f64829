"""DiaBlo as a registered adapter method (the adapter itself: qdiablo.diablo)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdiablo.adapters.budget import Budget, Shape, diablo_parameters, lora_parameters
from qdiablo.adapters.common import copy_full_
from qdiablo.adapters.method import AdapterMethod
from qdiablo.diablo import DiaBloConfig, DiaBloModel, get_diablo_model
from qdiablo.diablo.fingerprint import base_fingerprint, mismatch_message
from qdiablo.diablo.layer import DiaBloLinear, check_num_blocks
from qdiablo.diablo.model import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    METADATA_KEYS,
    read_adapter_config,
)
from qdiablo.errors import UserError
from qdiablo.health import NONFINITE_HINT, require_finite
from qdiablo.io import check_adapter_tensors, read_adapter_weights


def attach_diablo(
    model: nn.Module, num_blocks: int, target_modules: list[str] | str, dropout: float
) -> DiaBloModel:
    """Freeze the base and wrap the targets with zero-initialised float32 blocks."""
    config = DiaBloConfig(
        num_blocks=num_blocks,
        target_modules=target_modules,
        dropout=dropout,
        block_dtype="float32",
    )
    return get_diablo_model(model, config)


class DiaBloMethod(AdapterMethod):
    """DiaBlo: N diagonal blocks per layer, zero-initialised, with a base fingerprint."""

    name = "diablo"
    title = "DiaBlo"
    config_class = DiaBloConfig
    default_lr = 5e-4  # DiaBlo's GSM8K setting
    setting = "num_blocks"
    mergeable = True

    # ---- training ---------------------------------------------------------------------------

    def check(self, shapes: Mapping[str, Shape], config: Any) -> None:
        if config.num_blocks is not None and shapes:
            check_num_blocks(shapes, config.num_blocks, f"--num-blocks {config.num_blocks}")

    def trainable_count(self, shapes: Sequence[Shape], budget: Budget) -> int:
        return diablo_parameters(shapes, budget.num_blocks)  # raises for an invalid N

    def matched(self, budget: Budget, shapes: Sequence[Shape]) -> dict[str, Any]:
        r = budget.matched_rank
        count = lora_parameters(shapes, r) if r is not None else None
        return {"adapter": "lora", "rank": r, "trainable_parameters": count}

    def describe(self, num_blocks: int | None, rank: int | None) -> str:
        return f"N={num_blocks}"

    def attach(self, model: nn.Module, targets, budget: Budget, config: Any) -> DiaBloModel:
        return attach_diablo(model, budget.num_blocks, targets, config.dropout)

    # ---- the live model ---------------------------------------------------------------------

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, DiaBloModel)

    def save(self, model: DiaBloModel, folder: Path, gathered) -> None:
        tensors = None
        if gathered is not None:
            tensors = {k.removeprefix("model."): v for k, v in gathered.items()}
        model.save_pretrained(folder, tensors=tensors)

    def load_weights(self, model: DiaBloModel, folder: Path) -> None:
        saved = read_adapter_config(folder)
        config = DiaBloConfig.from_dict(
            {k: v for k, v in saved.items() if k not in METADATA_KEYS},
            source=str(folder / ADAPTER_CONFIG_NAME),
        )
        now = model.diablo_config.to_dict()
        if config.to_dict() != now:
            diff = [
                f"{k}: saved {v!r}, now {now[k]!r}"
                for k, v in config.to_dict().items()
                if now[k] != v
            ]
            raise UserError(
                f"{folder / ADAPTER_CONFIG_NAME}: other DiaBlo settings ({'; '.join(diff)})"
            )
        expected = saved.get("base_fingerprint") or {}
        if expected.get("sha256") != model.base_fingerprint["sha256"]:
            raise UserError(mismatch_message(folder, expected, model.base_fingerprint))
        tensors = read_adapter_weights(folder / ADAPTER_WEIGHTS_NAME)
        require_finite(tensors.items(), str(folder / ADAPTER_WEIGHTS_NAME), hint=NONFINITE_HINT)
        check_adapter_tensors(folder / ADAPTER_WEIGHTS_NAME, model.adapter_shapes(), tensors)
        with torch.no_grad():
            for name, layer in model.diablo_layers():
                copy_full_(layer.blocks, tensors[f"{name}.blocks"])

    def fingerprint_from_files(self, model: DiaBloModel, state_of: Any) -> None:
        targets = [name for name, _ in model.diablo_layers()]
        model.base_fingerprint = base_fingerprint(model.model, targets, state_of)

    def refresh_fingerprint(self, model: DiaBloModel, folder: Path) -> None:
        config_file = folder / ADAPTER_CONFIG_NAME
        config = json.loads(config_file.read_text(encoding="utf-8"))
        targets = [name for name, _ in model.diablo_layers()]
        config["base_fingerprint"] = base_fingerprint(model.model, targets)
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    # ---- a saved folder ---------------------------------------------------------------------

    def recognizes(self, config: Mapping[str, Any]) -> str | None:
        return self.name if config.get("method") == self.name else None

    def load(self, model: nn.Module, folder: Path, kind: str, *, force: bool = False):
        return DiaBloModel.from_pretrained(model, folder, force=force)  # checks finiteness itself

    # ---- export -----------------------------------------------------------------------------

    def merged_layer(self, module: nn.Module, dtype: torch.dtype) -> nn.Module | None:
        return module.merged_linear(dtype) if isinstance(module, DiaBloLinear) else None

    def merge_and_unload(self, model: DiaBloModel, dtype: torch.dtype) -> nn.Module:
        return model.merge_and_unload(dtype=dtype)

    def card_lines(self, kind: str, cfg: Mapping[str, Any]) -> list[str]:
        fingerprint = cfg.get("base_fingerprint") or {}
        excluded = cfg.get("exclude_modules")
        count = cfg.get("trainable_parameters")
        return [
            f"- DiaBlo, N = {cfg.get('num_blocks')} diagonal blocks per layer "
            f"(blocks in {cfg.get('block_dtype')}, dropout {cfg.get('dropout')})",
            f"- target modules: {_v(cfg.get('target_modules'))}"
            + (f" (excluding {_v(excluded)})" if excluded else ""),
            f"- trainable parameters: {_v(f'{count:,}' if isinstance(count, int) else count)}",
            f"- base fingerprint: `{fingerprint.get('sha256', '?')[:16]}` "
            f"({fingerprint.get('description', '?')})",
        ]

    # ---- the memory planner -----------------------------------------------------------------

    def plan_attach(self, model: nn.Module, num_blocks: int, targets):
        quiet = logging.getLogger("qdiablo.diablo.model")
        level, quiet.level = quiet.level, logging.WARNING  # no "wrapped N layers" per plan
        try:
            config = DiaBloConfig(num_blocks=num_blocks, target_modules=targets, dropout=0.0)
            return get_diablo_model(model, config)
        finally:
            quiet.setLevel(level)

    def activation_bytes_per_layer(self, per_block, inputs, dropout, rank, compute_bytes) -> int:
        """Each distinct input once (q, k, v share one, gate and up another), and a byte per
        input value for the dropout masks."""
        masks = sum(a.in_features for a in per_block) if dropout > 0 else 0
        return sum(inputs.values()) + masks


def _v(x: Any) -> str:
    """A card value: "not recorded" for None, a list joined."""
    if x is None:
        return "not recorded"
    if isinstance(x, list | tuple):
        return ", ".join(map(str, x)) or "none"
    return str(x)
