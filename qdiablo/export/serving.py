"""The export's folders for serving engines: `marlin/` (`--serve marlin`, vLLM and SGLang) and
`gguf/` (`--gguf`, llama.cpp and ollama), and the model card's lines about them.

Both start from the merge (W + Dᵀ on the dequantized base, in float32), as `merged/` does; each
asks `fresh_merge` for its own copy, because re-quantizing consumes it. An exact GGUF uses the
same re-quantization as `merged-gptq/` (the base's settings with the export's overrides), so when
both are asked the one already done is reused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from qdiablo.export.gguf import (
    GGUF_DIR,
    GGUFPlan,
    GGUFStats,
    check_gguf_inputs,
    plan_gguf,
    write_gguf,
)
from qdiablo.export.marlin import MARLIN_DIR, check_shapes, marlin_config, marlin_lines
from qdiablo.export.merge import requantize
from quantizers import QuantConfig, QuantLinear, save_quantized
from quantizers.calibration import find_decoder_blocks

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    """What the export writes for serving engines."""

    marlin: bool = field(default=False, metadata={"help": "write marlin/ (vLLM, SGLang)"})
    marlin_bits: int = field(default=4, metadata={"help": "marlin/: 4 or 8 bits"})
    marlin_group_size: int = field(default=128, metadata={"help": "marlin/: 32, 64, 128 or -1"})
    gguf: str | None = field(
        default=None,
        metadata={"help": "write gguf/: 'auto' (exact Q4 when possible), 'q8_0' or 'f16'"},
    )

    @property
    def any(self) -> bool:
        return self.marlin or self.gguf is not None


@dataclass
class ServePlan:
    """The settings each serving folder is written with, checked before any work."""

    marlin: QuantConfig | None = None
    marlin_strict: list[str] = field(default_factory=list)  # layers Marlin's tile rule refuses
    gguf: GGUFPlan | None = None

    @property
    def needs_calibration(self) -> bool:
        return self.marlin is not None or (self.gguf is not None and self.gguf.exact)


def block_linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """The decoder blocks' linear layers (float or packed): path -> (in_features, out_features)."""
    prefix, blocks = find_decoder_blocks(model)
    return {
        f"{prefix}.{name}": (m.in_features, m.out_features)
        for name, m in blocks.named_modules()
        if isinstance(m, nn.Linear | QuantLinear)
    }


def plan_serving(
    options: ServeOptions, requant: QuantConfig, base: nn.Module, tokenizer=None
) -> ServePlan:
    """Check the options against the base model (its layers, architecture and tokenizer) before
    any work; `requant` is the re-quantization the export would use for merged-gptq/ (the base's
    settings with the overrides)."""
    shapes = block_linear_shapes(base)
    plan = ServePlan()
    if options.marlin:
        plan.marlin = marlin_config(requant, options.marlin_bits, options.marlin_group_size)
        plan.marlin_strict = check_shapes(shapes, options.marlin_group_size)
    if options.gguf is not None:
        check_gguf_inputs(base.config, tokenizer)
        plan.gguf = plan_gguf(options.gguf, requant, shapes)
    return plan


def write_serving(
    plan: ServePlan,
    folder: Path,
    fresh_merge: Callable[[], nn.Module],
    tokenizer,
    calib: list[Tensor] | None,
    name: str,
    requantized: nn.Module | None = None,
) -> list[str]:
    """Write gguf/ and marlin/ into `folder` as `plan` says, and return the card's lines.

    `requantized`: merged-gptq/'s model, when the export re-quantized the merge already."""
    lines: list[str] = []
    if plan.gguf is not None:
        gplan, change, reused = plan.gguf, None, False
        if not gplan.exact:
            model = fresh_merge()
        elif requantized is not None and getattr(requantized, "quant_config", None) == gplan.config:
            model, reused = requantized, True
        else:
            model = fresh_merge()
            change = requantize(model, calib, gplan.config)
        (folder / GGUF_DIR).mkdir()
        stats = write_gguf(model, folder / GGUF_DIR / gplan.file_name, tokenizer, gplan, name)
        lines += gguf_lines(gplan, stats, change, reused)
        del model
    if plan.marlin is not None:
        model = fresh_merge()
        change = requantize(model, calib, plan.marlin)
        save_quantized(model, folder / MARLIN_DIR, tokenizer)
        lines += ["", *marlin_lines(plan.marlin.quantization_config(), change, plan.marlin_strict)]
        del model
    return lines


def gguf_lines(
    plan: GGUFPlan, stats: GGUFStats, change: Mapping[str, Any] | None, reused: bool
) -> list[str]:
    """The card's lines on gguf/."""
    file = f"{GGUF_DIR}/{plan.file_name}"
    counts = ", ".join(f"{n} {k}" for k, n in sorted(stats.tensors.items()))
    if plan.exact:
        cfg = plan.config
        lines = [
            f"`{file}` holds the merge re-quantized with {cfg.method}"
            f"{' + MagR' if cfg.magr else ''} at 4 bits, group size {cfg.group_size} "
            f"({'the same model as merged-gptq/' if reused else 'the base settings'}), its "
            f"quantized layers written block for block as {plan.qtype}: d = s"
            + (
                ", codes unchanged (w = s·(q − 8))."
                if plan.qtype == "Q4_0"
                else ", m = −s·z rounded to fp16, codes unchanged."
            ),
        ]
        if plan.qtype == "Q4_1":
            lines[0] += (
                " llama.cpp's weights equal qdiablo's up to that rounding of m: at most "
                f"{stats.max_abs_m_rounding:.3g} ({stats.max_rel_m_rounding:.3g} of the block's "
                "scale)."
            )
    else:
        lines = [f"`{file}`: {plan.reason}."]
    lines += [
        "",
        f"Tensors: {counts} (norms F32; embeddings and head "
        f"{'Q8_0' if plan.qtype == 'Q8_0' else 'F16'}). "
        f"Tokenizer and chat template in the metadata; pre-tokenizer "
        f"`{stats.pre_tokenizer or 'default'}`.",
    ]
    lines += [f"- {n}" for n in stats.notes]
    if change is not None:
        lines.append("")
        lines.append(
            f"Re-quantizing moved the logits by max {change['max_abs_logit_change']:.4g}, mean "
            f"{change['mean_abs_logit_change']:.4g} on {change['windows']} calibration windows; "
            f"top-1 agreement {100 * (change['top1_agreement'] or 0):.1f}%."
        )
    return lines


def serving_usage(parts: Sequence[str], gguf_file: str | None) -> list[str]:
    """The card's "how to serve" lines for the folders present."""
    lines = []
    if "marlin" in parts:
        lines += [
            "vLLM or SGLang (GPTQ-Marlin), from `marlin/`:",
            "",
            "```bash",
            "vllm serve EXPORT_DIR/marlin",
            "python -m sglang.launch_server --model-path EXPORT_DIR/marlin",
            "```",
            "",
        ]
    if gguf_file:
        lines += [
            "llama.cpp or ollama, from the GGUF:",
            "",
            "```bash",
            f"llama-cli -m EXPORT_DIR/{GGUF_DIR}/{gguf_file}",
            f"printf 'FROM EXPORT_DIR/{GGUF_DIR}/{gguf_file}\\n' > Modelfile",
            "ollama create NAME -f Modelfile && ollama run NAME",
            "```",
            "",
        ]
    return lines
