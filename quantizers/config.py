"""QuantConfig: every quantization setting, validated, with the checkpoint's JSON form."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from quantizers.registry import METHOD_NAMES, get_method

METHODS = METHOD_NAMES  # every registered quantizer (quantizers/registry.py), read live
BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
MAGR_SOLVERS = ("fista", "plain")
RECON_PARAMS = ("scales+codes", "scales", "codes")
RECON_SCHEDULES = ("cosine", "constant")
E2E_LOSSES = ("kl", "lm")

# MagR's β scale shrink by bit width, per channel and per group alike, as the official MagR code
# sets it. Chosen by measurement (BENCHMARKS.md, the quantizer defaults table): at W2 g64 on
# SmolLM2, β = 0.8 took MagR+GPTQ's perplexity from 7,173 (β = 1.0, the earlier group-size rule)
# to 328.
BETA_BY_BITS = {2: 0.8, 3: 0.9, 4: 1.0, 8: 1.0}


def default_beta(bits: int, group_size: int) -> float:
    """MagR's β: 0.8 / 0.9 / 1.0 / 1.0 at 2 / 3 / 4 / 8 bits, whatever the group size (kept as
    an argument: the rule is per grid)."""
    del group_size  # the measured rule does not depend on it
    return BETA_BY_BITS[bits]


@dataclass
class QuantConfig:
    """How to quantize a model's decoder blocks (docs/gptq.md, docs/magr.md).

    Each field's metadata (`help`, and `choices` where the values are few) is also the source of
    `qdiablo quantize`'s flags."""

    method: str = field(
        default="gptq",
        metadata={
            "help": "the quantizer: 'gptq' (error-compensating, needs calibration data), 'rtn' "
            "(round to nearest), or any other registered in quantizers/registry.py",
            "choices": METHODS,
        },
    )
    bits: int = field(default=4, metadata={"help": "bits per weight", "choices": BITS})
    group_size: int = field(
        default=128,
        metadata={
            "help": "input columns sharing one scale/zero: -1 (per output channel) or a power of "
            "two >= 16; a last group that does not fill up is partial (g_idx maps it)"
        },
    )
    sym: bool = field(
        default=False,
        metadata={"help": "symmetric grid (zero point fixed at 2^(bits-1)); default asymmetric"},
    )
    desc_act: bool = field(
        default=False,
        metadata={"help": "GPTQ act-order: quantize columns by decreasing Hessian diagonal"},
    )
    static_groups: bool = field(
        default=False,
        metadata={"help": "GPTQ: fix every group's grid before quantizing (keeps g_idx monotone)"},
    )
    true_sequential: bool = field(
        default=True,
        metadata={
            "help": "inside a block, quantize q,k,v -> o -> gate,up -> down, each on inputs "
            "that pass through the already-quantized layers"
        },
    )
    damp_percent: float = field(
        default=0.01,
        metadata={"help": "GPTQ damping, a fraction of mean(diag H); retried x10 on failure"},
    )
    cd_sweeps: int = field(
        default=0,
        metadata={
            "help": "coordinate-descent (COMQ) sweeps after quantizing, against the original "
            "weights; 0 = off (the reference uses 1, and 30 at 2-bit)"
        },
    )
    cd_damp: float = field(
        default=0.01,
        metadata={
            "help": "coordinate-descent damping, a fraction of mean(diag H); the reference's "
            "0.75 trades output error for closeness to the original weights"
        },
    )
    magr: bool = field(
        default=False, metadata={"help": "MagR magnitude reduction before quantizing"}
    )
    magr_alpha: float | None = field(
        default=None,
        metadata={"help": "MagR ℓ∞ weight α (on H/λmax); default 1e-3 per channel, 1e-4 grouped"},
    )
    magr_iters: int = field(
        default=50,
        metadata={
            "help": "MagR iterations; 50 FISTA iterations reach a lower objective than the "
            "paper's 200 plain ones"
        },
    )
    magr_solver: str = field(
        default="fista",
        metadata={
            "help": "'fista' (accelerated) or 'plain' proximal gradient",
            "choices": MAGR_SOLVERS,
        },
    )
    beta: float | None = field(
        default=None,
        metadata={
            "help": "scale shrink β in (0, 1]: scale = β·(max−min)/(2^bits−1); default with magr: "
            "0.8 / 0.9 / 1.0 at 2 / 3 / 4+ bits (the official MagR code's rule), else 1.0"
        },
    )
    reconstruct: bool = field(
        default=False,
        metadata={
            "help": "block-wise reconstruction after GPTQ/RTN: train each block's codes and "
            "scales so its outputs on the quantized model's inputs match the full-precision "
            "block's (the packed layout is unchanged; needs calibration data)"
        },
    )
    recon_epochs: float = field(
        default=4.0,
        metadata={
            "help": "reconstruction: epochs over all training windows per block, in shuffled "
            "mini-batches of --recon-batch-size windows (held-out early stopping ends most "
            "blocks after about half of them at the default learning rates)"
        },
    )
    recon_steps: int | None = field(
        default=None,
        metadata={
            "help": "reconstruction: Adam steps per block (one mini-batch each); "
            "overrides --recon-epochs"
        },
    )
    recon_batch_size: int = field(
        default=4, metadata={"help": "reconstruction: calibration windows per step"}
    )
    recon_lr_code: float = field(
        default=3e-2,
        metadata={"help": "reconstruction: learning rate of the code latents (in code units)"},
    )
    recon_lr_scale: float = field(
        default=3e-3,
        metadata={"help": "reconstruction: learning rate of the per-group scale multipliers"},
    )
    recon_lr_norm: float = field(
        default=1e-3,
        metadata={"help": "reconstruction: learning rate of the normalisation weights"},
    )
    recon_params: str = field(
        default="scales+codes",
        metadata={"help": "reconstruction: what is trained", "choices": RECON_PARAMS},
    )
    recon_norms: bool = field(
        default=False,
        metadata={
            "help": "reconstruction: also train each block's RMSNorm/LayerNorm weights (stored in "
            "full precision beside the packed layers)"
        },
    )
    recon_schedule: str = field(
        default="cosine",
        metadata={
            "help": "reconstruction: learning-rate schedule over a block's planned steps",
            "choices": RECON_SCHEDULES,
        },
    )
    recon_holdout: float = field(
        default=0.25,
        metadata={
            "help": "reconstruction: held-out windows, to measure the error and stop early, as a "
            "share of the calibration windows, in [0, 1); `qdiablo quantize` takes them apart "
            "(the windows after --calib's, or --recon-heldout), the library from the end of its "
            "calibration data when given none apart; neither GPTQ nor reconstruction fits them"
        },
    )
    recon_eval_every: int = field(
        default=8,
        metadata={"help": "reconstruction: steps between held-out evaluations"},
    )
    recon_patience: int = field(
        default=2,
        metadata={
            "help": "reconstruction: held-out evaluations in a row without a new best before a "
            "block stops (its best parameters are kept); 1 stops at the first rise"
        },
    )
    recon_e2e_epochs: float = field(
        default=2.0,
        metadata={
            "help": "reconstruction's end-to-end stage after the blocks: epochs over the "
            "calibration windows training every layer's scales so that the model's next-token "
            "distributions match the full-precision model's (KL on its top-k, computed before "
            "quantizing); 0 = off. At W2 g64 on SmolLM2 it took the benchmark perplexity from "
            "50.5 to 17.4 (BENCHMARKS.md, issue 21)"
        },
    )
    recon_e2e_lr: float = field(
        default=3e-3,
        metadata={"help": "reconstruction's end-to-end stage: learning rate of the scales"},
    )
    recon_e2e_loss: str = field(
        default="kl",
        metadata={
            "help": "reconstruction's end-to-end stage: 'kl' to the full-precision model's "
            "next-token distributions, or 'lm', the calibration text's own next-token loss",
            "choices": E2E_LOSSES,
        },
    )
    recon_e2e_topk: int = field(
        default=64,
        metadata={"help": "reconstruction's end-to-end stage: teacher tokens kept per position"},
    )
    recon_seed: int = field(
        default=0, metadata={"help": "reconstruction: seed of the mini-batch order"}
    )
    checkpoint_format: str = field(
        default="gptq_v2",
        metadata={
            "help": "zero-point convention written: 'gptq_v2' (stores the zero as is; GPTQModel's "
            "own format) or 'gptq' (v1, stores zero−1; qdiablo then keeps zeros >= 1 so nothing "
            "wraps). GPTQModel refuses asymmetric v1 checkpoints that it did not write itself, "
            "so v2 is the default",
            "choices": CHECKPOINT_FORMATS,
        },
    )

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(
                f"QuantConfig.{name}: expected {expected}, got {getattr(self, name)!r}"
            )

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool)

        if not isinstance(self.method, str):
            raise bad("method", " or ".join(repr(m) for m in METHODS))
        method = get_method(self.method)  # a ValueError naming the registered ones
        if not is_int(self.bits) or self.bits not in BITS:
            raise bad("bits", "one of 2, 3, 4, 8")
        g = self.group_size
        if not is_int(g) or not (g == -1 or (g >= 16 and g & (g - 1) == 0)):
            raise bad("group_size", "-1 (per channel) or a power of two >= 16, e.g. 32, 64, 128")
        for name in (
            "sym", "desc_act", "static_groups", "true_sequential", "magr", "reconstruct",
            "recon_norms",
        ):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        method.check(self)  # what the method declares it supports
        if not is_num(self.damp_percent) or not 0 < self.damp_percent <= 1:
            raise bad("damp_percent", "a number in (0, 1]")
        if not is_int(self.cd_sweeps) or self.cd_sweeps < 0:
            raise bad("cd_sweeps", "an integer >= 0")
        if not is_num(self.cd_damp) or self.cd_damp < 0:
            raise bad("cd_damp", "a number >= 0")
        if self.magr_alpha is not None and (not is_num(self.magr_alpha) or self.magr_alpha <= 0):
            raise bad("magr_alpha", "a positive number (or None for the default)")
        if not is_int(self.magr_iters) or self.magr_iters < 1:
            raise bad("magr_iters", "an integer >= 1")
        if self.magr_solver not in MAGR_SOLVERS:
            raise bad("magr_solver", " or ".join(repr(s) for s in MAGR_SOLVERS))
        if self.beta is not None and (not is_num(self.beta) or not 0 < self.beta <= 1):
            raise bad("beta", "a number in (0, 1] (or None for the default)")
        if self.recon_steps is not None and (not is_int(self.recon_steps) or self.recon_steps < 1):
            raise bad("recon_steps", "an integer >= 1 (or None: from --recon-epochs)")
        if not is_num(self.recon_epochs) or not self.recon_epochs > 0:
            raise bad("recon_epochs", "a positive number")
        if not is_int(self.recon_batch_size) or self.recon_batch_size < 1:
            raise bad("recon_batch_size", "an integer >= 1")
        if self.recon_schedule not in RECON_SCHEDULES:
            raise bad("recon_schedule", " or ".join(repr(p) for p in RECON_SCHEDULES))
        if not is_num(self.recon_e2e_epochs) or self.recon_e2e_epochs < 0:
            raise bad("recon_e2e_epochs", "a number >= 0")
        if self.recon_e2e_loss not in E2E_LOSSES:
            raise bad("recon_e2e_loss", " or ".join(repr(p) for p in E2E_LOSSES))
        if not is_int(self.recon_e2e_topk) or self.recon_e2e_topk < 1:
            raise bad("recon_e2e_topk", "an integer >= 1")
        if not is_int(self.recon_seed) or self.recon_seed < 0:
            raise bad("recon_seed", "an integer >= 0")
        for name in ("recon_lr_code", "recon_lr_scale", "recon_lr_norm", "recon_e2e_lr"):
            if not is_num(getattr(self, name)) or not getattr(self, name) > 0:
                raise bad(name, "a positive number")
        if self.recon_params not in RECON_PARAMS:
            raise bad("recon_params", " or ".join(repr(p) for p in RECON_PARAMS))
        if not is_num(self.recon_holdout) or not 0 <= self.recon_holdout < 1:
            raise bad("recon_holdout", "a number in [0, 1)")
        if not is_int(self.recon_eval_every) or self.recon_eval_every < 1:
            raise bad("recon_eval_every", "an integer >= 1")
        if not is_int(self.recon_patience) or self.recon_patience < 1:
            raise bad("recon_patience", "an integer >= 1")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise bad("checkpoint_format", " or ".join(repr(f) for f in CHECKPOINT_FORMATS))

    # Settings derived from the fields (kept out of __post_init__ so dataclasses.replace works).

    @property
    def resolved_beta(self) -> float:
        if self.beta is not None:
            return float(self.beta)
        return default_beta(self.bits, self.group_size) if self.magr else 1.0

    @property
    def resolved_magr_alpha(self) -> float:
        if self.magr_alpha is not None:
            return float(self.magr_alpha)
        return 1e-3 if self.group_size == -1 else 1e-4

    @property
    def min_zero(self) -> int:
        """The v1 format stores zero − 1, so its asymmetric zero points must stay >= 1."""
        return 1 if self.checkpoint_format == "gptq" and not self.sym else 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"QuantConfig: unknown fields {unknown}; known: {', '.join(sorted(known))}"
            )
        return cls(**data)

    def quantization_config(self) -> dict[str, Any]:
        """The GPTQ `quantize_config.json` / `config.json → quantization_config` entry.

        The keys GPTQModel and transformers read are at the top level; qdiablo's own settings
        (method, MagR, β, coordinate descent) are recorded under `meta.qdiablo`."""
        return {
            "quant_method": "gptq",
            "checkpoint_format": self.checkpoint_format,
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "static_groups": self.static_groups,
            "true_sequential": self.true_sequential,
            "damp_percent": self.damp_percent,
            "lm_head": False,
            "pack_dtype": "int32",
            "meta": {
                "quantizer": ["qdiablo"],
                "qdiablo": {
                    **self.to_dict(),
                    "resolved_beta": self.resolved_beta,
                    "resolved_magr_alpha": self.resolved_magr_alpha if self.magr else None,
                },
            },
        }
