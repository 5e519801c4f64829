"""What quantization did, layer by layer: the report `quantize_model` attaches to the model
(`model.quantization_report`), saved as quantization_report.json/.md beside the weights."""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from quantizers.e2e import E2EReport
from quantizers.reconstruct import BlockRecon, recon_markdown

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    """What quantization did to one layer.

    rel_error: ‖XWᵀ − XŴᵀ‖ / ‖XWᵀ‖ on the calibration inputs (None without calibration data).
    max_abs_before/after: median over rows (or row-groups) of max |w|, before and after MagR.
    magr_change: ‖XWᵀ − XW_magrᵀ‖ / ‖XWᵀ‖, the output change MagR alone made.
    """

    name: str
    shape: tuple[int, int]
    rel_error: float | None = None
    max_abs_before: float | None = None
    max_abs_after: float | None = None
    magr_change: float | None = None
    damp_percent: float | None = None  # GPTQ's damping after any Cholesky retries


@dataclass
class QuantReport:
    """Per-layer report of one quantize_model run (attached as `model.quantization_report`)."""

    config: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    calibration_tokens: int = 0
    seconds: float = 0.0
    reconstruction: list[BlockRecon] = field(default_factory=list)
    heldout_windows: int = 0  # windows reconstruction held out (not fitted by GPTQ either)
    reconstruction_seconds: float = 0.0
    e2e: E2EReport | None = None  # reconstruction's end-to-end stage (recon_e2e_epochs > 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def mean_rel_error(self) -> float | None:
        errors = [r.rel_error for r in self.layers if r.rel_error is not None]
        return sum(errors) / len(errors) if errors else None

    def to_markdown(self) -> str:
        """A table for a model card."""
        lines = [
            "| layer | shape | rel. output error | median max abs w (before → after MagR) |",
            "|---|---|---|---|",
        ]
        for r in self.layers:
            err = "—" if r.rel_error is None else f"{r.rel_error:.4f}"
            mags = (
                "—"
                if r.max_abs_before is None
                else f"{r.max_abs_before:.4f} → {r.max_abs_after:.4f}"
            )
            lines.append(f"| {r.name} | {r.shape[0]}×{r.shape[1]} | {err} | {mags} |")
        retried = self.cholesky_fallbacks()
        if retried:
            lines += [
                "",
                f"GPTQ's Cholesky needed more damping than {self.config['damp_percent']:g} on "
                f"{len(retried)} of {len(self.layers)} layers: "
                + ", ".join(f"{r.name} ({r.damp_percent:g})" for r in retried),
            ]
        recon = recon_markdown(self.reconstruction, self.heldout_windows)
        if self.e2e is not None:
            e = self.e2e
            held = (
                ""
                if e.heldout_before is None
                else (
                    f": held-out loss {e.heldout_before:.5f} → "
                    f"{e.heldout_after:.5f}{'' if e.kept else ' (not improved: scales unchanged)'}"
                )
            )
            recon += ["", f"End-to-end scales: {e.steps} steps in {e.seconds:.0f} s{held}"]
        return "\n".join(lines + recon) + "\n"

    def cholesky_fallbacks(self, min_damp: float = 0.0) -> list[LayerReport]:
        """GPTQ layers whose Cholesky needed more damping than configured (above min_damp)."""
        configured = self.config.get("damp_percent")
        return [
            r
            for r in self.layers
            if r.damp_percent is not None
            and r.damp_percent > configured
            and r.damp_percent >= min_damp
        ]


def relative_output_error(
    W: Tensor, Q: Tensor, H: Tensor, matmul_dtype: torch.dtype | None = None
) -> float:
    """‖X(W−Q)ᵀ‖ / ‖XWᵀ‖ computed from H = XᵀX/n alone (matmuls optionally in a faster dtype:
    it is a report, three digits are plenty)."""
    D, W = (W - Q).float(), W.float()
    if matmul_dtype is not None:
        Hm = H.to(matmul_dtype)
        num = float(((D.to(matmul_dtype) @ Hm).float() * D).sum())
        den = float(((W.to(matmul_dtype) @ Hm).float() * W).sum())
    else:
        num = float(((D @ H) * D).sum())
        den = float(((W @ H) * W).sum())
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0


def median_max_abs(W: Tensor, group_size: int) -> float:
    """Median over rows (or over each row's groups) of the largest |w|."""
    A = W.abs()
    if group_size != -1 and group_size < W.shape[1]:
        groups = -(-W.shape[1] // group_size)
        A = torch.nn.functional.pad(A, (0, groups * group_size - W.shape[1]))
        A = A.reshape(W.shape[0], groups, group_size)
        return float(A.amax(dim=2).median())
    return float(A.amax(dim=1).median())


def log_block(name: str, layers: list[LayerReport], bar) -> None:
    """One INFO line per block (the per-layer lines are DEBUG; all are in the report)."""
    errors = [r.rel_error for r in layers if r.rel_error is not None]
    if not errors:
        return
    worst = max(layers, key=lambda r: r.rel_error or 0.0)
    line = (
        f"{name}: rel. output error mean {statistics.mean(errors):.4f}, "
        f"max {worst.rel_error:.4f} ({worst.name.rsplit('.', 1)[-1]})"
    )
    shrink = [r.max_abs_after / r.max_abs_before for r in layers if r.max_abs_before]
    if shrink:
        line += f"; MagR median max|w| x{statistics.mean(shrink):.2f}"
    log.info(line)
    bar.set_postfix(rel_err=f"{statistics.mean(errors):.4f}")
