"""TrainConfig: every knob of a training run, with its help string (also the CLI's flags).

`qdiablo train --help` is generated from these fields (by `qdiablo.flags`), and a run writes the
resolved config to `train_config.json`, so the flags, the YAML config keys and the recorded
settings share one list.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from qdiablo.adapters.registry import ADAPTER_CHOICES, get_adapter
from qdiablo.data import DEFAULT_TEMPLATE, EVAL_SETS, MAX_LENGTH, TEMPLATES
from qdiablo.errors import UserError
from qdiablo.kinds import TRAIN_BASE_KINDS

BASE_KINDS = TRAIN_BASE_KINDS  # `--base`: the loader's kinds but "auto" (qdiablo.kinds)
ADAPTERS = ADAPTER_CHOICES  # `--adapter`: the registered methods (qdiablo.adapters.registry)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULERS = ("linear", "cosine", "constant_with_warmup", "constant")
# `--optimizer` → TrainingArguments.optim. SGD (no momentum) is the reference where a run must be
# compared update by update (its step is linear in the gradient; AdamW's is not).
OPTIMIZERS = {"adamw": "adamw_torch", "sgd": "sgd"}
# A run's output folder (written by `qdiablo.train.run`, read by export and the pipeline).
CONFIG_FILE = "train_config.json"
RESULTS_FILE = "train_results.json"
LOG_FILE = "log.jsonl"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"


def _meta(help: str, group: str, **extra: Any) -> dict[str, Any]:
    return {"help": help, "group": group, **extra}


@dataclass
class TrainConfig:
    """One training run: the base, the adapter, the data, the optimisation and the outputs."""

    # ---- base --------------------------------------------------------------------------------
    model: str = field(
        default="smollm2",
        metadata=_meta(
            "the model: a hub id or local Hugging Face folder, 'smollm2' (the embedded "
            "SmolLM2-135M-Instruct, whose float weights are its GGUF's Q4_1 weights "
            "dequantized), or for --base gptq/rtn a folder written by `qdiablo quantize`",
            "base",
        ),
    )
    gguf_file: str | None = field(
        default=None, metadata=_meta("GGUF file inside --model's folder", "base")
    )
    base: str = field(
        default="fp",
        metadata=_meta(
            "how the frozen base is held: fp (float weights in --dtype), gptq | rtn (packed "
            "integers from a `qdiablo quantize` folder), nf4 (bitsandbytes NF4 + double "
            "quantization: QLoRA's base) or nf2 (NF2 fake-quantized, absmax per 64)",
            "base",
            choices=BASE_KINDS,
        ),
    )
    dtype: str = field(
        default="auto",
        metadata=_meta(
            "dtype of the base's float weights and compute (bfloat16 gives the 16-bit references); "
            "auto: bfloat16 on a GPU that has it, else float32; adapter weights always train in "
            "float32",
            "base",
            choices=DTYPES,
        ),
    )
    device: str = field(
        default="auto",
        metadata=_meta(
            "where the run computes: auto (a CUDA GPU when there is one, else the CPU), cpu, "
            "cuda or cuda:N (N = this process's LOCAL_RANK; pick another GPU with "
            "CUDA_VISIBLE_DEVICES)",
            "base",
        ),
    )
    packed_storage: str = field(
        default="int32",
        metadata=_meta(
            "dtype that packed (gptq/rtn) layers store their bytes in; the bytes never change. "
            "int32 is never touched by casts and FSDP2 shards it; a float dtype (as "
            "bitsandbytes' quant_storage) suits tools that only shard floating parameters",
            "base",
            choices=("int32", "bfloat16", "float16", "float32"),
        ),
    )
    # ---- adapter -----------------------------------------------------------------------------
    adapter: str = field(
        default="diablo", metadata=_meta("the trainable adapter", "adapter", choices=ADAPTERS)
    )
    num_blocks: int | None = field(
        default=None,
        metadata=_meta("DiaBlo blocks per layer, N (default 64; the paper's setting)", "adapter"),
    )
    rank: int | None = field(
        default=None, metadata=_meta("LoRA rank r (default 64; the paper's comparison)", "adapter")
    )
    match_params: bool = field(
        default=False,
        metadata=_meta(
            "derive the other method's setting from the one given so both train about the "
            "same number of parameters: r = round(Σ in·out/N ÷ Σ(in+out)), or the valid N "
            "nearest r's count",
            "adapter",
        ),
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata=_meta(
            "layers to adapt (name suffixes), or all-linear (default: the architecture's, "
            "e.g. q_proj k_proj v_proj up_proj down_proj on LLaMA-family models)",
            "adapter",
        ),
    )
    dropout: float = field(
        default=0.05, metadata=_meta("dropout on the adapter's input", "adapter")
    )
    lora_alpha: float | None = field(
        default=None, metadata=_meta("LoRA alpha (default 2·r)", "adapter")
    )
    train_scales: bool = field(
        default=False,
        metadata=_meta(
            "also train the packed base's per-group scales (float32 multipliers on the stored "
            "fp16 scales; codes and zeros stay frozen), saved with the adapter and folded into "
            "the base by export (--base gptq/rtn only; not under FSDP)",
            "adapter",
        ),
    )
    scale_lr: float = field(
        default=2e-4,
        metadata=_meta("learning rate of the trained scale multipliers", "adapter"),
    )
    distill: str | None = field(
        default=None,
        metadata=_meta(
            "distil from this full-precision teacher (a hub id, a folder, or 'smollm2'): the "
            "loss becomes KL(teacher ‖ student) over the next-token distributions of every "
            "training token, mixed with the LM loss by --distill-weight (not under FSDP)",
            "adapter",
        ),
    )
    distill_weight: float = field(
        default=1.0,
        metadata=_meta(
            "with --distill, the loss is w·KL + (1 − w)·LM loss (1: distillation alone)", "adapter"
        ),
    )
    # ---- data --------------------------------------------------------------------------------
    data: list[str] | None = field(
        default=None,
        metadata=_meta(
            "training files (Math10K JSON array or JSON Lines); default: the shipped real "
            "1,824-record subset of math_10k.json",
            "data",
        ),
    )
    template: str = field(
        default=DEFAULT_TEMPLATE,
        metadata=_meta("prompt template", "data", choices=tuple(TEMPLATES)),
    )
    max_length: int = field(
        default=MAX_LENGTH, metadata=_meta("tokens per example (prompt + response + EOS)", "data")
    )
    answer_suffix: bool = field(
        default=False,
        metadata=_meta('append "The answer is {answer}." to outputs that lack it', "data"),
    )
    decontaminate: list[str] = field(
        default_factory=lambda: list(EVAL_SETS),
        metadata=_meta(
            "drop training records whose normalised instruction equals a test item of these sets "
            "(names or test files); 'none' keeps everything",
            "data",
        ),
    )
    max_records: int | None = field(
        default=None, metadata=_meta("use only the first N records after shuffling", "data")
    )
    # ---- optimisation ------------------------------------------------------------------------
    epochs: float = field(default=3.0, metadata=_meta("training epochs", "optimisation"))
    max_steps: int = field(
        default=-1,
        metadata=_meta("stop after this many optimizer steps (overrides --epochs)", "optimisation"),
    )
    batch_size: int = field(
        default=16,
        metadata=_meta(
            "effective batch: examples per optimizer step, over all devices", "optimisation"
        ),
    )
    micro_batch_size: int | None = field(
        default=None,
        metadata=_meta(
            "examples per forward pass on each device; default: on a GPU the largest that the "
            "memory planner (`qdiablo plan`) fits in its memory at --max-length tokens, on the "
            "CPU --batch-size ÷ devices; gradients accumulate over batch_size ÷ "
            "(micro_batch_size × devices) passes",
            "optimisation",
        ),
    )
    lr: float | None = field(
        default=None,
        metadata=_meta("peak learning rate (default: DiaBlo 5e-4, LoRA 3e-4)", "optimisation"),
    )
    optimizer: str = field(
        default="adamw",
        metadata=_meta(
            "adamw (torch AdamW) or sgd (plain SGD: lr × gradient, a reference for comparisons)",
            "optimisation",
            choices=tuple(OPTIMIZERS),
        ),
    )
    weight_decay: float = field(default=0.0, metadata=_meta("weight decay", "optimisation"))
    scheduler: str = field(
        default="linear",
        metadata=_meta("learning-rate schedule", "optimisation", choices=SCHEDULERS),
    )
    warmup: float = field(
        default=0.05,
        metadata=_meta(
            "warmup: a fraction of the steps if < 1, else a number of steps", "optimisation"
        ),
    )
    max_grad_norm: float = field(
        default=1.0, metadata=_meta("clip gradients to this global norm (0: off)", "optimisation")
    )
    precision: str = field(
        default="auto",
        metadata=_meta(
            "autocast mixed precision: auto is bf16 on a GPU that has it (fp16 on older GPUs), "
            "fp32 on the CPU (fp16 needs a GPU; on CPU use bf16 or fp32)",
            "optimisation",
            choices=PRECISIONS,
        ),
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata=_meta(
            "recompute activations in backward to save memory; default: on for a quantized "
            "base (gptq, rtn, nf4, nf2) on a GPU, else off",
            "optimisation",
        ),
    )
    seed: int = field(
        default=42,
        metadata=_meta("seed for initialisation, data order and dropout", "optimisation"),
    )
    # ---- outputs -----------------------------------------------------------------------------
    output: str = field(default="runs/train", metadata=_meta("output folder", "outputs"))
    logging_steps: int = field(default=10, metadata=_meta("log every N optimizer steps", "outputs"))
    save_steps: int = field(
        default=200,
        metadata=_meta("checkpoint every N optimizer steps (0: only at the end)", "outputs"),
    )
    save_total_limit: int | None = field(
        default=2, metadata=_meta("keep only the newest N checkpoints", "outputs")
    )
    resume: str | None = field(
        default=None,
        metadata=_meta(
            "resume from a checkpoint folder, or 'auto' for the newest complete one in --output",
            "outputs",
        ),
    )
    overwrite: bool = field(
        default=False,
        metadata=_meta(
            "start afresh in an --output holding an earlier run (only train's own files are "
            "removed) or other files (they are kept)",
            "outputs",
        ),
    )
    progress: bool = field(default=True, metadata=_meta("show a progress bar", "outputs"))

    def __post_init__(self) -> None:
        for name in ("target_modules", "decontaminate", "data"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise UserError(
                    f"{_flag(f.name)} {getattr(self, f.name)!r}: choose from {', '.join(choices)}"
                )
        at_least_one = ("batch_size", "max_length", "logging_steps")
        optional_at_least_one = (
            "num_blocks", "rank", "micro_batch_size", "max_records", "save_total_limit"
        )  # fmt: skip
        for name in at_least_one + optional_at_least_one:
            value = getattr(self, name)
            if value is not None or name in at_least_one:
                _check_int(name, value, minimum=1)
        _check_int("save_steps", self.save_steps, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        _check_int("max_steps", self.max_steps, minimum=-1)
        if self.max_steps == 0:
            raise UserError(
                "--max-steps 0: give -1 (train --epochs epochs) or a number of steps ≥ 1"
            )
        for name, low, high, closed in (
            ("dropout", 0.0, 1.0, False),
            ("warmup", 0.0, None, True),
            ("epochs", 0.0, None, True),
            ("weight_decay", 0.0, None, True),
            ("max_grad_norm", 0.0, None, True),
            ("distill_weight", 0.0, 1.0, True),
        ):
            _check_float(name, getattr(self, name), low, high, closed)
        for name in ("lr", "lora_alpha", "scale_lr"):
            value = getattr(self, name)
            if value is not None:
                _check_float(name, value, 0.0, None, closed=False, low_open=True)
        if self.epochs <= 0 and self.max_steps <= 0:
            raise UserError("give --epochs > 0 or --max-steps > 0")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else get_adapter(self.adapter).default_lr

    @property
    def target_spec(self) -> list[str] | str | None:
        """target_modules in DiaBloConfig / LoraConfig form ('all-linear' is a string; None is
        the architecture's default, qdiablo.diablo.targets)."""
        if self.target_modules is None:
            return None
        return "all-linear" if self.target_modules == ["all-linear"] else list(self.target_modules)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_int(name: str, value: Any, minimum: int) -> None:
    """An int (not a bool, not a float) ≥ minimum, else a one-line error naming the flag."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{_flag(name)} {value!r}: expected a whole number")
    if value < minimum:
        raise UserError(f"{_flag(name)} {value}: must be ≥ {minimum}")


def _check_float(
    name: str,
    value: Any,
    low: float,
    high: float | None,
    closed: bool,
    low_open: bool = False,
) -> None:
    """A finite number in [low, high] (high excluded unless `closed`; low excluded if
    `low_open`), else a one-line error naming the flag."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{_flag(name)} {value!r}: expected a finite number")
    if value < low or (low_open and value == low):
        raise UserError(f"{_flag(name)} {value}: must be {'>' if low_open else '≥'} {low:g}")
    if high is not None and (value > high or (not closed and value == high)):
        raise UserError(f"{_flag(name)} {value}: must be {'≤' if closed else '<'} {high:g}")


def field_defaults() -> dict[str, Any]:
    """Each TrainConfig field's default: what a run recorded before the field existed meant."""
    return {f.name: f.default for f in fields(TrainConfig)}


# Settings that may differ between a run and its resumption.
RESUME_FREE_FIELDS = {
    "packed_storage",  # the same bytes either way
    "device",  # where; what it computes in (precision, dtype) is compared, resolved
    "resume",
    "overwrite",
    "output",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "progress",
}
