"""Math10K test sets as evaluation tasks, and the scoring rules of docs/math10k.md §6.

Scoring looks at the generated response only (never the prompt):

- **Numbers** (gsm8k, SVAMP, mawps, AddSub, MultiArith, SingleEq): the last match of
  `-?\\d+\\.?\\d*` in the response, commas removed, is correct when it is within 1e-3 of the label.
  This is LLM-Adapters' and ApiQ's rule, so "3/4" reads as 4.
- **Letters** (AQuA): the reference rule takes the first capital A-E anywhere in the response
  (so "Answer: (C)" reads as "A", from "Answer"); it feeds the mean, to stay comparable with
  published numbers. The strict rule, reported beside it, takes the letter the response commits
  to: the first "answer is (C)" / "Answer: C" / "answer is option C", or else a response that
  opens with an option marker such as "(C)" or "C)" (unless it goes on to list other options).

None of the extraction functions raise, whatever the text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qdiablo.data import (
    ALL_SETS,
    EVAL_SETS,
    EXTRA_SETS,
    MathRecord,
    canonical_set_name,
    load_test_set,
    test_set_path,
)
from qdiablo.errors import UserError

NUMBER = "number"
LETTER = "letter"
MAIN, EXTRA, CUSTOM = "main", "extra", "custom"

TOLERANCE = 1e-3
LETTERS = "ABCDE"

# Task groups accepted wherever a task name is: `math4` is the 4-task mean's sets.
TASK_GROUPS = {
    "math4": EVAL_SETS,
    "main": EVAL_SETS,
    "extra": EXTRA_SETS,
    "all": ALL_SETS,
}


@dataclass(frozen=True)
class Task:
    """One test set to evaluate: its records, how answers are scored, and where it belongs.

    `group` is "main" (in the 4-task mean), "extra" (AddSub, MultiArith, SingleEq: reported apart,
    since they overlap Math10K's training sources) or "custom" (a user file, reported apart).
    """

    name: str
    records: tuple[MathRecord, ...]
    kind: str
    group: str
    source: str

    def __len__(self) -> int:
        return len(self.records)


# --------------------------------------------------------------------------------------------
# Loading tasks
# --------------------------------------------------------------------------------------------


def _looks_like_path(spec: str) -> bool:
    return Path(spec).suffix.lower() in (".json", ".jsonl") or "/" in spec or "\\" in spec


def answer_kind(records: Sequence[MathRecord], source: str) -> str:
    """ "letter" when every answer is one of A-E, else "number" (every answer must parse).

    A numeric set with an answer that is not a number is an error naming the file and record.
    """
    answers = [r.answer.strip() for r in records]
    if answers and all(a in LETTERS and len(a) == 1 for a in answers):
        return LETTER
    for i, (r, a) in enumerate(zip(records, answers)):  # records are the file's, in order
        if parse_number(a) is None:
            raise UserError(
                f"{source}: record {i}: answer {r.answer!r} is neither a number nor a letter A-E",
                hint="a test file's answers are all numbers, or all option letters A-E",
            )
    return NUMBER


def load_task(spec: str) -> Task:
    """A vendored set by name (case-insensitive) or a custom test file by path."""
    if _looks_like_path(spec):
        path = Path(spec)
        if not path.is_file():
            raise UserError(
                f"test file not found: {path}",
                hint=f"pass a file path, or a set name: {', '.join(ALL_SETS)}",
            )
        records = load_test_set(str(path))
        name = path.parent.name if path.stem == "test" and path.parent.name else path.stem
        if name.lower() in {s.lower() for s in ALL_SETS}:
            name = f"{name}-custom"
        return Task(name, tuple(records), answer_kind(records, str(path)), CUSTOM, str(path))
    try:
        name = canonical_set_name(spec)
    except UserError:
        raise UserError(
            f"unknown task '{spec}'",
            hint=f"choose from {', '.join(ALL_SETS)}, the groups {', '.join(TASK_GROUPS)}, "
            "or pass a test file's path",
        ) from None
    records = load_test_set(name)
    group = MAIN if name in EVAL_SETS else EXTRA
    path = str(test_set_path(name))
    return Task(name, tuple(records), answer_kind(records, path), group, path)


def resolve_tasks(specs: Sequence[str] | None) -> list[Task]:
    """Task names, groups (math4/main, extra, all) or file paths -> tasks, in order, deduplicated.

    No specs means the four sets of the mean.
    """
    expanded: list[str] = []
    for spec in specs or ["math4"]:
        group = TASK_GROUPS.get(spec.lower()) if not _looks_like_path(spec) else None
        expanded.extend(group if group else [spec])
    tasks, seen = [], set()
    for spec in expanded:
        task = load_task(spec)
        if task.name in seen:
            if task.group == CUSTOM:
                raise UserError(f"two tasks are named '{task.name}'; rename one of the files")
            continue
        seen.add(task.name)
        tasks.append(task)
    if not tasks:
        raise UserError("no tasks to evaluate")
    return tasks


# --------------------------------------------------------------------------------------------
# Extraction and scoring
# --------------------------------------------------------------------------------------------

_NUMBER_RE = re.compile(r"-?\d+\.?\d*")


def parse_number(text: str) -> float | None:
    """float(text), or None when it is not a finite number. Never raises."""
    try:
        value = float(text)
    except (TypeError, ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def extract_number(response: str) -> str | None:
    """The last `-?\\d+\\.?\\d*` in the response with commas removed, as text; None if none."""
    if not isinstance(response, str):
        return None
    matches = _NUMBER_RE.findall(response.replace(",", ""))
    return matches[-1] if matches else None


def number_correct(extracted: str | None, label: str) -> bool:
    """Within 1e-3 of the label (the reference's `abs(label - pred) <= 0.001`)."""
    if extracted is None:
        return False
    pred, gold = parse_number(extracted), parse_number(label)
    if pred is None or gold is None:
        return False
    return abs(pred - gold) <= TOLERANCE


_REFERENCE_LETTER = re.compile(r"[A-E]")


def extract_letter(response: str) -> str | None:
    """The reference AQuA rule: the first capital A-E anywhere in the (stripped) response."""
    if not isinstance(response, str):
        return None
    m = _REFERENCE_LETTER.search(response.strip())
    return m.group(0) if m else None


# "answer is (C)", "Answer: C", "the answer is option C", "answer is choice (E)", "Answer - B".
# The word "answer" in any case; the letter itself must be a capital, standing alone.
_COMMITTED_LETTER = re.compile(
    r"(?i:answer)(?:\s+(?i:is))?\s*[:=\-]?\s*"
    r"(?:(?i:option|choice)(?![A-Za-z])\s*[:\-]?\s*)?"
    r"\(?([A-E])(?![A-Za-z0-9])"
)
# A response that opens with an option marker: "(C) 42", "C) 42", "C.", "C: ...", or just "C".
_LEADING_LETTER = re.compile(r"^(?:\(([A-E])\)|([A-E])(?:\)|[.:](?=\s|$)|$))")
# An option marker at the start of a line ("B) 7", "(C) 9", "D. 12"): several distinct ones mean
# the response lists the choices rather than picking one.
_LISTED_OPTION = re.compile(r"(?m)^\s*\(?([A-E])(?:\)|[.:](?=\s|$))")


def extract_letter_strict(response: str) -> str | None:
    """The letter the response commits to; None when it commits to none. Never raises."""
    if not isinstance(response, str):
        return None
    m = _COMMITTED_LETTER.search(response)
    if m:
        return m.group(1)
    m = _LEADING_LETTER.match(response.strip())
    if m and len(set(_LISTED_OPTION.findall(response))) <= 1:  # not an echoed list of options
        return m.group(1) or m.group(2)
    return None


@dataclass(frozen=True)
class Score:
    """How one response scores. `strict` fields are set for letter tasks only."""

    extracted: str | None
    correct: bool
    extracted_strict: str | None = None
    correct_strict: bool | None = None


def score_response(kind: str, response: str, label: str) -> Score:
    """Score one generated response against its label with the task kind's rule."""
    if kind == LETTER:
        gold = label.strip()
        ref, strict = extract_letter(response), extract_letter_strict(response)
        return Score(ref, ref == gold, strict, strict == gold)
    if kind == NUMBER:
        extracted = extract_number(response)
        return Score(extracted, number_correct(extracted, label))
    raise ValueError(f"unknown task kind {kind!r}")
