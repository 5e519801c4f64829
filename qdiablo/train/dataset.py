"""The training set: Math10K records -> cleaned, decontaminated, tokenized examples.

Templates, tokenization and the loss mask come from `qdiablo.data` (shared with evaluation); this
module only chains them, counts what each step did, and hands `Trainer` a Dataset and a collator.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from qdiablo.data import (
    IGNORE_INDEX,
    MathRecord,
    decontaminate,
    encode_records,
    load_shipped_train_records,
    load_test_set,
    pad_batch,
    read_records,
    with_answer_suffix,
)
from qdiablo.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class DataSummary:
    """What the data pipeline did, recorded in the run's outputs."""

    sources: list[str]
    records: int = 0
    decontaminated_against: list[str] = field(default_factory=list)
    dropped_per_set: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    answer_suffix_added: int = 0
    too_long_skipped: int = 0
    examples: int = 0
    response_tokens: int = 0
    total_tokens: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def decontamination_line(self) -> str:
        if not self.decontaminated_against:
            return "decontamination: off"
        detail = ", ".join(f"{k} {v}" for k, v in self.dropped_per_set.items() if v) or "no matches"
        return (
            f"decontamination: dropped {self.dropped} of {self.records} training records matching "
            f"{', '.join(self.decontaminated_against)} ({detail})"
        )


class ExampleDataset(torch.utils.data.Dataset):
    """Encoded examples: dicts of `input_ids`, `labels` and `attention_mask` lists."""

    def __init__(self, examples: Sequence[dict[str, list[int]]]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


@dataclass
class PadCollator:
    """Right-pads a batch (labels with -100), as `qdiablo.data.pad_batch` does."""

    pad_token_id: int

    def __call__(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return pad_batch(examples, self.pad_token_id)


def load_training_records(data: Sequence[str] | None) -> tuple[list[MathRecord], list[str]]:
    """The records of the given files in order, or the shipped real subset."""
    if not data:
        return load_shipped_train_records(), ["shipped math_10k subset (1,824 records)"]
    records: list[MathRecord] = []
    for path in data:
        records.extend(read_records(path))
    return records, list(data)


def select_records(
    data: Sequence[str] | None = None,
    answer_suffix: bool = False,
    decontaminate_against: Sequence[str] = (),
    max_records: int | None = None,
    seed: int = 0,
) -> tuple[list[MathRecord], DataSummary]:
    """Read, decontaminate, subsample and optionally add the answer suffix (no tokenizer needed,
    so a bad data file fails before any model loads).

    `max_records` keeps a seeded random subset (the order of the rest is left to the sampler).
    """
    records, sources = load_training_records(data)
    summary = DataSummary(sources=sources, records=len(records))
    sets = [s for s in decontaminate_against if s.lower() != "none"]
    if sets:
        tests = {name: load_test_set(name) for name in sets}
        records, dropped = decontaminate(records, tests)
        summary.decontaminated_against = sets
        summary.dropped_per_set = dropped
        summary.dropped = summary.records - len(records)
    if max_records is not None and max_records < len(records):
        records = random.Random(seed).sample(records, max_records)
    if answer_suffix:
        suffixed = [with_answer_suffix(r) for r in records]
        summary.answer_suffix_added = sum(a is not b for a, b in zip(suffixed, records))
        records = suffixed
    return records, summary


def tokenize_records(
    tokenizer,
    records: Sequence[MathRecord],
    summary: DataSummary,
    template: str = "alpaca",
    max_length: int = 512,
) -> ExampleDataset:
    """Encode with the shared template (loss on the response, EOS appended); fills `summary`."""
    examples = encode_records(tokenizer, records, template, max_length)
    summary.too_long_skipped = len(records) - len(examples)
    summary.examples = len(examples)
    summary.total_tokens = sum(len(e["input_ids"]) for e in examples)
    summary.response_tokens = sum(
        sum(label != IGNORE_INDEX for label in e["labels"]) for e in examples
    )
    if not examples:
        raise UserError(
            f"no training examples left: all {len(records)} prompts fill --max-length {max_length}",
            hint="raise --max-length",
        )
    log.info(
        "training set: %d examples, %d tokens (%d in responses)",
        summary.examples,
        summary.total_tokens,
        summary.response_tokens,
    )
    return ExampleDataset(examples)
