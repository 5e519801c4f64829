"""`qdiablo export --serve marlin`: the merged model re-quantized for GPTQ-Marlin (vLLM, SGLang).

Marlin, the fast GPTQ kernel of vLLM and SGLang, takes symmetric 4- or 8-bit GPTQ only: the
engines turn a GPTQ folder into Marlin when its `quantize_config.json` says `quant_method "gptq"`,
`bits` 4 or 8, `sym` true, `group_size` one of -1/32/64/128, and `desc_act` present (vLLM's and
SGLang's `GPTQMarlinConfig.is_gptq_marlin_compatible`; SGLang also requires `checkpoint_format`
not to be "marlin", which means an already repacked file). A symmetric grid has no zero points
for Marlin to read: a code q stands for s·(q − 2^(bits−1)), which is what qdiablo's symmetric
grid stores (zero point 8 or 128).

What is written, `marlin/`, is the merge (W + Dᵀ on the dequantized base) quantized again with
MagR + GPTQ on that grid, in the ordinary GPTQ layout (`save_quantized`):
- `checkpoint_format: "gptq"` (v1, zero points stored minus one): Marlin ignores symmetric zero
  points, and every fallback kernel (vLLM's and SGLang's `gptq_gemm`, exllama) reads v1, while
  SGLang's `gptq_gemm` reads any zeros as v1. The symmetric zero 8 is stored as 7, never wraps.
- `desc_act: false`: no act-order, so no `g_idx` permutation for the kernel to undo.
- the engines allocate `in_features // group_size` scale rows per layer, so a group size that
  does not divide a layer's input size is refused here, before any work (`check_shapes`).
Layers Marlin's strict shape rule refuses (output not a multiple of 64, input not of 128: SGLang
checks it, recent vLLM pads instead) are listed in the card, not refused: they still load and run
through the engines' other GPTQ kernels.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from qdiablo.errors import UserError
from quantizers import QuantConfig

log = logging.getLogger(__name__)

MARLIN_DIR = "marlin"
MARLIN_BITS = (4, 8)
MARLIN_GROUP_SIZES = (128, 64, 32, -1)
MIN_THREAD_N, MIN_THREAD_K = 64, 128  # Marlin's tile: output and input multiples


def marlin_config(base: QuantConfig, bits: int = 4, group_size: int = 128) -> QuantConfig:
    """The re-quantization for Marlin: MagR + GPTQ with the base's other settings (MagR's α and
    iterations, coordinate descent, reconstruction), on a symmetric `bits` grid of `group_size`,
    without act-order, saved as v1. β goes back to its default for the new bit width."""
    if bits not in MARLIN_BITS:
        raise UserError(f"--serve-bits {bits}: Marlin takes {' or '.join(map(str, MARLIN_BITS))}")
    if group_size not in MARLIN_GROUP_SIZES:
        raise UserError(
            f"--serve-group-size {group_size}: Marlin takes "
            f"{', '.join(map(str, MARLIN_GROUP_SIZES))}"
        )
    return dataclasses.replace(
        base,
        method="gptq",
        magr=True,
        bits=bits,
        group_size=group_size,
        sym=True,
        desc_act=False,
        static_groups=False,
        beta=None,
        checkpoint_format="gptq",
    )


def check_shapes(shapes: Mapping[str, tuple[int, int]], group_size: int) -> list[str]:
    """Refuse a group size that does not divide some layer's input (the engines would allocate
    fewer scale rows than the file holds), and return the layers Marlin's strict shape rule
    refuses, for the card. `shapes`: layer path -> (in_features, out_features)."""
    bad = [(n, i) for n, (i, _) in shapes.items() if group_size != -1 and i % group_size]
    if bad:
        name, k = bad[0]
        fits = [
            g for g in MARLIN_GROUP_SIZES if g == -1 or all(i % g == 0 for i, _ in shapes.values())
        ]
        raise UserError(
            f"--serve-group-size {group_size} does not divide {name}'s {k} inputs "
            f"({len(bad)} layers): vLLM and SGLang read {k // group_size} groups, the file would "
            f"hold {-(-k // group_size)}",
            hint=f"pass --serve-group-size {' or '.join(map(str, fits))}",
        )
    return [n for n, (i, o) in shapes.items() if o % MIN_THREAD_N or i % MIN_THREAD_K]


def marlin_lines(
    config: Mapping[str, Any], change: Mapping[str, Any], strict: list[str]
) -> list[str]:
    """The card's lines on marlin/."""
    ours = (config.get("meta") or {}).get("qdiablo") or {}
    lines = [
        "`marlin/` is `merged/` re-quantized for the GPTQ-Marlin kernels of vLLM and SGLang: "
        f"MagR + GPTQ, {config['bits']}-bit symmetric, group size {config['group_size']}, no "
        f"act-order, `checkpoint_format: {config['checkpoint_format']}`"
        f"{' (MagR α ' + str(ours.get('resolved_magr_alpha')) + ')' if ours.get('magr') else ''}.",
        "",
        "**Re-quantizing changes the outputs**: on "
        f"{change['windows']} calibration windows ({change['tokens']} tokens) the logits moved "
        f"by max {change['max_abs_logit_change']:.4g} and mean "
        f"{change['mean_abs_logit_change']:.4g}"
        f" (max |logit| {change['max_abs_logit']:.4g}); the top-1 token agrees on "
        f"{100 * (change['top1_agreement'] or 0):.1f}% of positions.",
    ]
    if strict:
        lines += [
            "",
            f"{len(strict)} layers (e.g. `{strict[0]}`) do not fill Marlin's "
            f"{MIN_THREAD_K}×{MIN_THREAD_N} tile (input a multiple of {MIN_THREAD_K}, output of "
            f"{MIN_THREAD_N}): SGLang's Marlin refuses them, and vLLM pads them (recent versions) "
            "or runs them with its other GPTQ kernels (`--quantization gptq`).",
        ]
    return lines
