"""Evaluation presets and settings (light: no torch import, so the CLI parser stays fast)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from qdiablo.data import REFERENCE_MODES
from qdiablo.errors import UserError


@dataclass(frozen=True)
class Preset:
    """A decoding protocol: the prompt template, the number of beams and the token budget."""

    name: str
    template: str
    max_new_tokens: int
    num_beams: int
    description: str


PRESETS = {
    "apiq": Preset("apiq", "alpaca", 512, 1, "ApiQ / DiaBlo: clean Alpaca template, greedy"),
    "llm-adapters": Preset(
        "llm-adapters", "llm-adapters", 256, 4, "LLM-Adapters: its indented template, 4 beams"
    ),
    "chat": Preset("chat", "chat", 512, 1, "the tokenizer's chat template, greedy"),
}
DEFAULT_PRESET = "apiq"


@dataclass(frozen=True)
class EvalSettings:
    """How to evaluate. `None` fields take the preset's value."""

    preset: str = DEFAULT_PRESET
    template: str | None = None
    max_new_tokens: int | None = None
    num_beams: int | None = None
    batch_size: int = 16
    limit: int | None = None
    generate: bool = True
    nll: bool = True
    reference: str = "output"
    dequant_cache: bool = True  # packed layers dequantized once for the run (else per call)

    def resolved(self) -> dict[str, Any]:
        if self.preset not in PRESETS:
            raise UserError(
                f"unknown preset '{self.preset}'", hint=f"choose from {', '.join(PRESETS)}"
            )
        if self.reference not in REFERENCE_MODES:
            raise UserError(
                f"unknown NLL reference '{self.reference}'",
                hint=f"choose from {', '.join(REFERENCE_MODES)}",
            )
        if self.batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1, got {self.limit}")
        if not (self.generate or self.nll):
            raise UserError("nothing to do: both generation and the NLL are turned off")
        p = PRESETS[self.preset]
        out = asdict(self)
        out["template"] = self.template or p.template
        out["max_new_tokens"] = (
            p.max_new_tokens if self.max_new_tokens is None else self.max_new_tokens
        )
        out["num_beams"] = p.num_beams if self.num_beams is None else self.num_beams
        if out["max_new_tokens"] < 1 or out["num_beams"] < 1:
            raise UserError("max_new_tokens and num_beams must be at least 1")
        return out
