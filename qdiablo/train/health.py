"""Numerical health of a training run: a diverged run is an error, never a saved result.

- Non-finite: every step folds "is the loss finite" and "is the gradient norm finite" into a flag
  on the device (no host sync); at each logging or saving step, and at the end, the flag and the
  adapter's values are read once (one sync, where Trainer syncs to log anyway). Anything
  non-finite stops the run with a `TrainingDiverged` error naming what and when, before that
  step's checkpoint is written: the checkpoints already on disk are good, and no adapter is
  saved as the result.
- Rising loss: a logged loss above max(2 × the first logged loss, the first + 1 nat) means the
  run is going the wrong way (e.g. a learning rate far too high, with clipping on): a warning in
  the log, in log.jsonl and in train_results.json ("warnings"), once per run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from qdiablo.errors import UserError
from qdiablo.health import first_nonfinite
from qdiablo.train.checkpoint import latest_checkpoint

log = logging.getLogger(__name__)

RISE_FACTOR = 2.0  # a logged loss above max(RISE_FACTOR × first, first + RISE_MARGIN) warns
RISE_MARGIN = 1.0


class TrainingDiverged(UserError):
    """The loss, a gradient norm or an adapter value stopped being finite."""


def rise_threshold(first: float) -> float:
    """The logged loss above which the run is said to be diverging (see the module docstring)."""
    return max(RISE_FACTOR * first, first + RISE_MARGIN)


class HealthMonitor:
    """The device-side flags and the checks at logging/saving steps (see the module docstring)."""

    def __init__(self, checkpoints: Path) -> None:
        self.checkpoints = Path(checkpoints)
        self.flags: torch.Tensor | None = None  # [loss not finite, grad norm not finite]
        self.last_good_step = 0

    def _flags(self, device: torch.device) -> torch.Tensor:
        if self.flags is None or self.flags.device != device:
            self.flags = torch.zeros(2, dtype=torch.bool, device=device)
        return self.flags

    def observe(self, loss: torch.Tensor | None = None, grad_norm: Any = None) -> None:
        """Fold a step's loss / gradient norm into the flags, on their device (no sync)."""
        if isinstance(loss, torch.Tensor):
            flags = self._flags(loss.device)
            flags[0] |= ~torch.isfinite(loss.detach()).all()
        if isinstance(grad_norm, torch.Tensor):
            flags = self._flags(grad_norm.device)
            flags[1] |= ~torch.isfinite(grad_norm.detach()).all()
        elif isinstance(grad_norm, float) and not math.isfinite(grad_norm):
            self._flags(torch.device("cpu"))[1] = True

    def check(self, model: nn.Module, step: int, final_loss: float | None = None) -> None:
        """Raise TrainingDiverged if anything went non-finite since the last check."""
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        device = params[0][1].device if params else torch.device("cpu")
        bad = torch.zeros(3, dtype=torch.int32, device=device)
        if self.flags is not None:
            bad[:2] = self.flags.to(device=device, dtype=torch.int32)
        for _, p in params:
            local = p.to_local() if hasattr(p, "to_local") else p
            bad[2] |= (~torch.isfinite(local.detach()).all()).to(torch.int32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        loss_bad, grad_bad, value_bad = (bool(v) for v in bad.tolist())  # the one sync
        loss_bad = loss_bad or (final_loss is not None and not math.isfinite(final_loss))
        if not (loss_bad or grad_bad or value_bad):
            self.last_good_step = step
            return
        raise TrainingDiverged(self._message(params, step, loss_bad, grad_bad, value_bad),
                               hint=self._hint())  # fmt: skip

    def _message(self, params, step: int, loss_bad: bool, grad_bad: bool, value_bad: bool) -> str:
        what = [w for w, bad in (("the loss", loss_bad), ("the gradient norm", grad_bad)) if bad]
        if value_bad:
            found = first_nonfinite(params)
            what.append(f"adapter values (first: {found[0]})" if found else "adapter values")
        since = f"after step {self.last_good_step}" if self.last_good_step else "from the start"
        listed = ", ".join(what[:-1]) + (" and " if len(what) > 1 else "") + what[-1]
        return (
            f"training diverged {since}, by step {step}: {listed} not finite; stopped before "
            "saving anything from those steps"
        )

    def _hint(self) -> str:
        good = latest_checkpoint(self.checkpoints, warn=False)
        kept = f"the last good checkpoint is kept ({good})" if good else "no checkpoint was saved"
        return (
            f"{kept}; lower --lr, keep --max-grad-norm on (e.g. 1.0) or use --precision fp32, "
            "and train afresh with --overwrite"
        )


class LossRiseCallback(TrainerCallback):
    """Warns once when a logged loss rises far above the first (see the module docstring)."""

    def __init__(self, log_file: Path) -> None:
        self.log_file = Path(log_file)
        self.warnings: list[str] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        first = next((r["loss"] for r in state.log_history if "loss" in r), None)
        if self.warnings or loss is None or first is None or not math.isfinite(loss):
            return
        if loss > rise_threshold(first):
            text = (
                f"the loss rose from {first:.4f} to {loss:.4f} by step {state.global_step} "
                f"(above max({RISE_FACTOR:g} × the first, the first + {RISE_MARGIN:g})): the "
                "run is diverging; a lower --lr may help"
            )
            self.warnings.append(text)
            log.warning("%s", text)
            if state.is_world_process_zero:
                with self.log_file.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, "warning": text}) + "\n")
