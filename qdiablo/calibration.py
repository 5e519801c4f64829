"""Calibration data for quantization: texts from a file (or the shipped Math10K subset) turned
into the token batches `quantizers.quantize_model` takes. Used by `qdiablo quantize` and the
pipeline.

A source is one of:
- None: the real Math10K training subset shipped in the package, each record as its Alpaca
  prompt plus the worked solution (the distribution the adapter is later trained on), less the
  records whose instruction is a test item of the four evaluated sets: with `reconstruct`,
  calibration is training, and it must never see an item that is evaluated later;
- a `.json` / `.jsonl` file of Math10K records (`instruction`, `output`, `answer`), formatted
  the same way (records without an `output` contribute their prompt);
- any other file: plain UTF-8 text, split into paragraphs at blank lines.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from qdiablo.data import (
    DEFAULT_TEMPLATE,
    EVAL_SETS,
    build_prompt,
    decontaminate,
    load_shipped_train_records,
    load_test_set,
    read_records,
)
from qdiablo.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

    from quantizers.config import QuantConfig

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = 64
DEFAULT_SEQ_LEN = 256
DEFAULT_BATCH_SIZE = 8


def calibration_texts(
    source: str | Path | None = None, template: str = DEFAULT_TEMPLATE
) -> list[str]:
    """The calibration texts of a source (see the module docstring)."""
    if source is None:
        tests = {name: load_test_set(name) for name in EVAL_SETS}
        records, _ = decontaminate(load_shipped_train_records(), tests)
        return [build_prompt(r.instruction, template) + r.output for r in records]
    path = Path(source)
    if not path.is_file():
        raise UserError(f"calibration file not found: {path}")
    if path.suffix in (".json", ".jsonl"):
        records = read_records(path, require_output=False)
        return [build_prompt(r.instruction, template) + r.output for r in records]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from e
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        raise UserError(f"{path}: the calibration text file is empty")
    return paragraphs


def build_calibration_data(
    tokenizer,
    source: str | Path | None = None,
    num_samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    template: str = DEFAULT_TEMPLATE,
) -> list[Tensor]:
    """Calibration batches (a list of LongTensor [batch, seq_len]) from a source: texts joined
    with EOS and cut into `num_samples` windows of `seq_len` tokens."""
    from quantizers import tokenize_calibration  # deferred: torch, off the `--help` path

    texts = calibration_texts(source, template)
    where = "the shipped Math10K subset" if source is None else str(source)
    try:
        batches = tokenize_calibration(tokenizer, texts, num_samples, seq_len, batch_size)
    except ValueError as e:
        raise UserError(f"calibration data from {where}: {e}") from e
    log.info(
        "calibration: %d windows of %d tokens from %s",
        sum(b.shape[0] for b in batches),
        seq_len,
        where,
    )
    return batches


def add_calibration_arguments(parser, calib_help: str) -> None:
    """The --calib* flags shared by `qdiablo quantize` and `qdiablo export --requantize`."""
    parser.add_argument("--calib", metavar="FILE", help=calib_help)
    parser.add_argument(
        "--calib-samples",
        type=int,
        default=DEFAULT_SAMPLES,
        help=f"calibration windows (default {DEFAULT_SAMPLES})",
    )
    parser.add_argument(
        "--calib-seq-len",
        type=int,
        default=DEFAULT_SEQ_LEN,
        help=f"tokens per calibration window (default {DEFAULT_SEQ_LEN})",
    )
    parser.add_argument(
        "--calib-batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"windows per forward pass (default {DEFAULT_BATCH_SIZE})",
    )


def check_calibration_arguments(args) -> None:
    """The --calib* counts, checked before anything loads: one line naming the flag."""
    for dest, minimum in (("calib_samples", 1), ("calib_seq_len", 2), ("calib_batch_size", 1)):
        value = getattr(args, dest, None)
        if value is not None and value < minimum:
            raise UserError(f"--{dest.replace('_', '-')} {value}: must be ≥ {minimum}")


def check_reconstruction_windows(config: QuantConfig, windows: int, why: str = "") -> None:
    """Reconstruction holds out a share of the calibration windows to measure itself, so it
    needs at least 2; checked from the flags before anything loads, and again once the text is
    cut into windows (a short text gives fewer)."""
    if config.reconstruct and config.recon_holdout > 0 and windows < 2:
        raise UserError(
            f"--reconstruct needs at least 2 calibration windows (it holds some out to measure "
            f"itself); there would be {windows}{why}",
            hint="raise --calib-samples (and give a longer --calib text), or --recon-holdout 0",
        )
