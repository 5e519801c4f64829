"""The batches block-wise reconstruction trains and measures on: the calibration windows in
mini-batches, and the held-out windows (another source's, or the last share of the same)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from quantizers.config import QuantConfig


def _windows(batches: Sequence[Tensor]) -> list[Tensor]:
    return [w for batch in batches for w in batch.split(1)]


def _rebatch(windows: list[Tensor], size: int) -> list[Tensor]:
    """Consecutive windows of the same length into batches of at most `size`."""
    out: list[list[Tensor]] = []
    for w in windows:
        if out and len(out[-1]) < size and out[-1][0].shape == w.shape:
            out[-1].append(w)
        else:
            out.append([w])
    return [torch.cat(b) for b in out]


def split_holdout(
    calib_data: Sequence[Tensor], fraction: float, batch_size: int | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """Split calibration windows into (train, held-out) batches: the last round(fraction·n)
    windows are held out (at least one when fraction > 0), batched as the input was (or in
    `batch_size` windows)."""
    windows = _windows(calib_data)
    n = len(windows)
    hold = 0 if fraction <= 0 else min(max(1, round(fraction * n)), n - 1)
    if fraction > 0 and hold < 1:
        raise ValueError(
            f"reconstruction's held-out split needs at least 2 calibration windows, got {n}"
        )
    size = batch_size or calib_data[0].shape[0]
    return _rebatch(windows[: n - hold], size), _rebatch(windows[n - hold :], size)


def recon_batches(
    calib_data: Sequence[Tensor], heldout_data: Sequence[Tensor] | None, config: QuantConfig
) -> tuple[list[Tensor], int]:
    """The token batches quantize_model runs with reconstruction: the training windows in
    mini-batches of `recon_batch_size`, then the held-out ones; and how many batches are
    held out. Held-out windows come from `heldout_data` (another source or slice) when given,
    else the last `recon_holdout` share of `calib_data`."""
    size = config.recon_batch_size
    if heldout_data:
        train, held = _rebatch(_windows(calib_data), size), _rebatch(_windows(heldout_data), size)
    else:
        train, held = split_holdout(calib_data, config.recon_holdout, size)
    return train + held, len(held)
