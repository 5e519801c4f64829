"""Calibration data for quantization: token windows from a source, turned into the batches
`quantizers.quantize_model` takes. Used by `qdiablo quantize`, `export --requantize` and the
pipeline.

A source is one of:
- `math10k` (or None): the real Math10K training subset shipped in the package, each record as
  its Alpaca prompt plus the worked solution (the distribution the adapter is later trained
  on), less the records whose instruction is a test item of the four evaluated sets: with
  `reconstruct`, calibration is training, and it must never see an item that is evaluated later;
- `generated`: text sampled from the full-precision model itself (`qdiablo.generated`: seeded,
  cached), LLM-QAT's data-free recipe: it needs no data and is what the model knows;
- a `.json` / `.jsonl` file of Math10K records (`instruction`, `output`, `answer`), formatted
  the same way (records without an `output` contribute their prompt);
- any other file: plain UTF-8 text, split into paragraphs at blank lines.
Several sources share the windows (the first ones get one more when they do not divide).

Reconstruction's held-out windows (`heldout_windows`) come from another source, or from the
windows that follow the training ones in the same source (for `generated`: another seed), so
that its early stopping measures generalisation, not fit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
NAMED_SOURCES = ("math10k", "generated")
# The generated windows are cached in this folder beside the output folder (its parent), so that
# a rerun, or another output there (compare's 2- and 4-bit bases), reads them again.
CACHE_DIR_NAME = ".qdiablo-calib-cache"


def calibration_texts(
    source: str | Path | None = None, template: str = DEFAULT_TEMPLATE
) -> list[str]:
    """The calibration texts of a text source (see the module docstring)."""
    if source is None or str(source) == "math10k":
        tests = {name: load_test_set(name) for name in EVAL_SETS}
        records, _ = decontaminate(load_shipped_train_records(), tests)
        return [build_prompt(r.instruction, template) + r.output for r in records]
    path = Path(source)
    if not path.is_file():
        raise UserError(
            f"calibration file not found: {path}",
            hint=f"give a file, or one of the named sources: {', '.join(NAMED_SOURCES)}",
        )
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


def _sources(source: Any) -> list[str | None]:
    if source is None:
        return [None]
    if isinstance(source, str | Path):
        return [str(source)]
    return [None if s is None else str(s) for s in source] or [None]


def _describe(source: str | None) -> str:
    return "the shipped Math10K subset" if source in (None, "math10k") else str(source)


def source_windows(
    tokenizer,
    source: str | None,
    num: int,
    seq_len: int,
    *,
    skip: int = 0,
    template: str = DEFAULT_TEMPLATE,
    model=None,
    seed: int = 0,
    cache_dir: Path | None = None,
) -> Tensor:
    """LongTensor [n, seq_len] (n ≤ num, with a warning when the text runs out): windows
    skip..skip+num of a text source's token stream, or `num` windows sampled with `seed` from
    `model` for `generated`."""
    if source == "generated":
        if model is None:
            raise UserError("calibration source 'generated' needs the model to sample from")
        from qdiablo.generated import GenerationSpec, generated_windows

        return generated_windows(model, tokenizer, GenerationSpec(num, seq_len, seed), cache_dir)
    from quantizers import tokenize_calibration  # deferred: torch, off the `--help` path

    texts = calibration_texts(source, template)
    try:
        batches = tokenize_calibration(tokenizer, texts, skip + num, seq_len, skip + num)
    except ValueError as e:
        raise UserError(f"calibration data from {_describe(source)}: {e}") from e
    windows = batches[0][skip:]
    if not len(windows):
        raise UserError(
            f"calibration data from {_describe(source)}: no windows left after the first {skip}",
            hint="use fewer calibration windows, or another source for the held-out ones",
        )
    return windows


def calibration_windows(
    tokenizer, source: Any, num: int, seq_len: int, *, skip: int = 0, seed: int = 0, **kw
) -> Tensor:
    """`num` windows shared among one or more sources (see the module docstring)."""
    import torch

    sources = _sources(source)
    counts = [num // len(sources) + (i < num % len(sources)) for i in range(len(sources))]
    parts = []
    for src, count in zip(sources, counts):
        if count:
            n_skip = skip * count // num if num else 0
            parts.append(
                source_windows(tokenizer, src, count, seq_len, skip=n_skip, seed=seed, **kw)
            )
    return torch.cat(parts)


def build_calibration_data(
    tokenizer,
    source: Any = None,
    num_samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    template: str = DEFAULT_TEMPLATE,
    *,
    model=None,
    seed: int = 0,
    cache_dir: Path | None = None,
    skip: int = 0,
) -> list[Tensor]:
    """Calibration batches (a list of LongTensor [batch, seq_len]) from one or more sources:
    texts joined with EOS and cut into `num_samples` windows of `seq_len` tokens (after
    skipping `skip` windows), or windows sampled from `model` (`generated`)."""
    windows = calibration_windows(
        tokenizer,
        source,
        num_samples,
        seq_len,
        skip=skip,
        seed=seed,
        template=template,
        model=model,
        cache_dir=cache_dir,
    )
    log.info(
        "calibration: %d windows of %d tokens from %s",
        len(windows),
        seq_len,
        " + ".join(_describe(s) for s in _sources(source)),
    )
    return list(windows.split(batch_size))


def heldout_windows(
    tokenizer,
    calib: Any,
    heldout: Any,
    num: int,
    calib_num: int,
    seq_len: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    model=None,
    seed: int = 0,
    cache_dir: Path | None = None,
) -> list[Tensor]:
    """Reconstruction's held-out batches: `num` windows of `heldout` (None: the calibration
    source itself, the windows after its first `calib_num`; `generated`: another seed)."""
    same = heldout is None or _sources(heldout) == _sources(calib)
    return build_calibration_data(
        tokenizer,
        calib if heldout is None else heldout,
        num,
        seq_len,
        batch_size,
        model=model,
        seed=seed + 1 if same else seed,
        cache_dir=cache_dir,
        skip=calib_num if same else 0,
    )


def default_cache_dir(output: str | Path) -> Path:
    """Where generated calibration windows are cached: beside the output folder."""
    return Path(output).resolve().parent / CACHE_DIR_NAME


def add_calibration_arguments(parser, calib_help: str, heldout: bool = False) -> None:
    """The --calib* flags shared by `qdiablo quantize` and `qdiablo export --requantize` (and
    with `heldout`, quantize's --recon-heldout* flags)."""
    parser.add_argument("--calib", metavar="SOURCE", nargs="+", help=calib_help)
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
    parser.add_argument(
        "--calib-seed",
        type=int,
        default=0,
        help="seed of the `generated` source's sampling (default 0)",
    )
    parser.add_argument(
        "--calib-cache",
        metavar="DIR",
        help=f"folder caching generated calibration windows (default: {CACHE_DIR_NAME} beside "
        "--output)",
    )
    if not heldout:
        return
    parser.add_argument(
        "--recon-heldout",
        metavar="SOURCE",
        nargs="+",
        help="reconstruction's held-out windows: a source as for --calib (default: the windows "
        "that follow the calibration ones in the same source; for `generated`, another seed)",
    )
    parser.add_argument(
        "--recon-heldout-samples",
        type=int,
        default=None,
        help="held-out windows (default: --recon-holdout × --calib-samples, at least 1)",
    )


def check_calibration_arguments(args) -> None:
    """The --calib* counts, checked before anything loads: one line naming the flag."""
    for dest, minimum in (
        ("calib_samples", 1),
        ("calib_seq_len", 2),
        ("calib_batch_size", 1),
        ("calib_seed", 0),
        ("recon_heldout_samples", 1),
    ):
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
