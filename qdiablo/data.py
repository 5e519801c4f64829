"""Math10K records, the prompt templates, and tokenization: shared by training and `eval/`.

One place for the exact template strings (docs/math10k.md §3), so that training and evaluation can
never drift apart. Records follow LLM-Adapters' schema:
`{"instruction", "input": "", "output", "answer"}`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from qdiablo.errors import UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
MAX_LENGTH = 512

# --------------------------------------------------------------------------------------------
# Prompt templates
# --------------------------------------------------------------------------------------------

# The clean Alpaca no-input template (Stanford Alpaca; ApiQ's and pyreft's math template).
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# LLM-Adapters' evaluate.py template, reproduced with its trailing space and 16-space indents,
# because its published numbers were produced with exactly this string.
LLM_ADAPTERS_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request. \n\n"
    "                ### Instruction:\n"
    "                {instruction}\n\n"
    "                ### Response:\n"
    "                "
)

TEMPLATES = {"alpaca": ALPACA_TEMPLATE, "llm-adapters": LLM_ADAPTERS_TEMPLATE, "chat": None}
DEFAULT_TEMPLATE = "alpaca"


def build_prompt(instruction: str, template: str = DEFAULT_TEMPLATE, tokenizer=None) -> str:
    """The prompt text for one instruction; `chat` uses the tokenizer's own chat template."""
    if template not in TEMPLATES:
        raise UserError(
            f"unknown template '{template}'", hint=f"choose from {', '.join(TEMPLATES)}"
        )
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UserError("template 'chat' needs a tokenizer that has a chat template")
        messages = [{"role": "user", "content": instruction}]
        try:
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # jinja2's TemplateError (SecurityError included); jinja2 is lazy
            if not type(e).__module__.startswith("jinja2"):
                raise
            source = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
            raise UserError(
                f"the chat template of {source} cannot be applied: {type(e).__name__}: {e}",
                hint="use another --template (alpaca, llm-adapters), or fix the template's "
                "chat_template.jinja / tokenizer_config.json",
            ) from e
    return TEMPLATES[template].format(instruction=instruction)


def prompt_has_special_tokens(template: str) -> bool:
    """Chat prompts already hold their special tokens; plain templates get the tokenizer's BOS."""
    return template == "chat"


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MathRecord:
    """One Math10K-format example. `source` says where it came from, for error messages."""

    instruction: str
    output: str
    answer: str
    source: str = ""


REQUIRED_FIELDS = ("instruction", "output", "answer")


def read_records(path: str | Path, require_output: bool = True) -> list[MathRecord]:
    """Read a JSON array or JSON Lines file of Math10K records.

    Every schema error names the file, the record index (0-based) and the field.
    `require_output=False` accepts an empty or missing `output` (mawps test records have none).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from e
    raw = _parse_json_or_jsonl(text, path)
    records = []
    for i, item in enumerate(raw):
        where = f"{path}: record {i}"
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected an object, got {type(item).__name__}")
        for field in REQUIRED_FIELDS:
            if field == "output" and not require_output:
                continue
            if field not in item:
                raise UserError(f"{where}: missing field '{field}'")
        for field in REQUIRED_FIELDS:
            if field in item and not isinstance(item[field], str | int | float):
                raise UserError(f"{where}: field '{field}' must be a string")
        if not str(item["instruction"]).strip():
            raise UserError(f"{where}: field 'instruction' is empty")
        if not str(item["answer"]).strip():
            raise UserError(f"{where}: field 'answer' is empty")
        if require_output and not str(item["output"]).strip():
            raise UserError(f"{where}: field 'output' is empty")
        if str(item.get("input", "") or "").strip():
            log.debug("%s: non-empty 'input' is ignored by the no-input templates", where)
        records.append(
            MathRecord(
                instruction=str(item["instruction"]),
                output=str(item.get("output", "") or ""),
                answer=str(item["answer"]),
                source=f"{path.name}:{i}",
            )
        )
    if not records:
        raise UserError(f"{path}: no records")
    return records


def _parse_json_or_jsonl(text: str, path: Path) -> list:
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from e
        return data
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}: line {lineno} (record {len(items)}) is not valid JSON: {e.msg}",
                hint="the file must be a JSON array or JSON Lines (one object per line)",
            ) from e
    return items


# --------------------------------------------------------------------------------------------
# The vendored Math10K files
# --------------------------------------------------------------------------------------------

EVAL_SETS = ("gsm8k", "SVAMP", "mawps", "AQuA")  # the 4-task mean (ApiQ / DiaBlo protocol)
EXTRA_SETS = ("AddSub", "MultiArith", "SingleEq")  # overlap Math10K's sources: reported apart
ALL_SETS = EVAL_SETS + EXTRA_SETS
SHIPPED_TRAIN_FILES = ("math_1k_pyreft_e01e9d4.jsonl", "math_1k_pyreft_1c97edc.jsonl")


def resource_dir() -> Path:
    """The vendored Math10K folder inside the installed package."""
    return Path(str(resources.files("qdiablo") / "resources" / "math10k"))


def canonical_set_name(name: str) -> str:
    """'svamp' -> 'SVAMP'; unknown names are a UserError listing the known ones."""
    by_lower = {s.lower(): s for s in ALL_SETS}
    try:
        return by_lower[name.lower()]
    except KeyError:
        raise UserError(
            f"unknown test set '{name}'", hint=f"choose from {', '.join(ALL_SETS)}"
        ) from None


def test_set_path(name: str) -> Path:
    return resource_dir() / canonical_set_name(name) / "test.json"


def load_test_set(name_or_path: str) -> list[MathRecord]:
    """A vendored test set by name (case-insensitive), or a custom test file by path."""
    if Path(name_or_path).suffix in (".json", ".jsonl") or "/" in name_or_path:
        return read_records(name_or_path, require_output=False)
    return read_records(test_set_path(name_or_path), require_output=False)


def load_shipped_train_records() -> list[MathRecord]:
    """The real Math10K subset shipped in the package: 1,824 distinct records (of 9,919)."""
    seen, records = set(), []
    for name in SHIPPED_TRAIN_FILES:
        for r in read_records(resource_dir() / "train" / name):
            key = (r.instruction, r.output, r.answer)
            if key not in seen:
                seen.add(key)
                records.append(r)
    return records


# --------------------------------------------------------------------------------------------
# Cleaning: answer suffix and decontamination
# --------------------------------------------------------------------------------------------


def format_answer(answer: str) -> str:
    """'79.0' -> '79', '1.5' -> '1.5', 'C' -> 'C'."""
    try:
        value = float(answer)
    except ValueError:
        return answer.strip()
    return str(int(value)) if value.is_integer() else answer.strip()


_ANSWER_IS = re.compile(r"answer is", re.IGNORECASE)

# The sentence that states an answer: appended to training outputs that lack one, and the
# reference response of test records without an `output` (mawps).
ANSWER_SENTENCE = "The answer is {answer}."
REFERENCE_MODES = ("output", "answer")


def answer_sentence(answer: str) -> str:
    """'79.0' -> 'The answer is 79.'"""
    return ANSWER_SENTENCE.format(answer=format_answer(answer))


def reference_response(record: MathRecord, mode: str = "output") -> str:
    """The response scored by the smooth NLL metric (teacher-forced, after the prompt).

    `output`: the record's `output` with surrounding whitespace stripped, or the answer sentence
    when it is empty (mawps); `answer`: always the answer sentence ("The answer is 42.").
    """
    if mode not in REFERENCE_MODES:
        raise UserError(
            f"unknown reference mode '{mode}'", hint=f"choose from {', '.join(REFERENCE_MODES)}"
        )
    output = record.output.strip()
    if mode == "output" and output:
        return output
    return answer_sentence(record.answer)


def with_answer_suffix(record: MathRecord) -> MathRecord:
    """Append "The answer is {answer}." to an output that does not already state its answer."""
    if _ANSWER_IS.search(record.output):
        return record
    output = record.output.rstrip()
    sep = "\n" if output else ""
    return MathRecord(
        record.instruction,
        f"{output}{sep}{answer_sentence(record.answer)}",
        record.answer,
        record.source,
    )


def normalize_instruction(text: str) -> str:
    """Case- and whitespace-insensitive form used to match training items against test items."""
    return " ".join(text.lower().split())


def decontaminate(
    records: Sequence[MathRecord], test_sets: dict[str, Sequence[MathRecord]]
) -> tuple[list[MathRecord], dict[str, int]]:
    """Drop training records whose normalised instruction equals a test item of any given set.

    Returns the kept records and, per test set, how many training records matched it.
    """
    index: dict[str, list[str]] = {}
    for name, items in test_sets.items():
        for r in items:
            index.setdefault(normalize_instruction(r.instruction), []).append(name)
    kept, dropped = [], {name: 0 for name in test_sets}
    for r in records:
        hits = index.get(normalize_instruction(r.instruction))
        if hits:
            for name in set(hits):
                dropped[name] += 1
        else:
            kept.append(r)
    return kept, dropped


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------


def encode_prompt(tokenizer, instruction: str, template: str = DEFAULT_TEMPLATE) -> list[int]:
    """Token ids of the prompt, exactly as generation sees them."""
    prompt = build_prompt(instruction, template, tokenizer)
    add_special = not prompt_has_special_tokens(template)
    return tokenizer(prompt, add_special_tokens=add_special)["input_ids"]


def encode_example(
    tokenizer,
    record: MathRecord,
    template: str = DEFAULT_TEMPLATE,
    max_length: int = MAX_LENGTH,
    response: str | None = None,
) -> dict[str, list[int]]:
    """Prompt + response + EOS, with the loss on the response only.

    The prompt and the response are tokenized separately and concatenated, so the prompt ids are
    exactly those that generation conditions on and the label boundary is exact.
    """
    prompt_ids = encode_prompt(tokenizer, record.instruction, template)
    text = record.output if response is None else response
    response_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def encode_records(
    tokenizer,
    records: Iterable[MathRecord],
    template: str = DEFAULT_TEMPLATE,
    max_length: int = MAX_LENGTH,
) -> list[dict[str, list[int]]]:
    """Encode records, skipping those whose prompt alone fills `max_length` (no response left)."""
    examples, skipped = [], 0
    for r in records:
        ex = encode_example(tokenizer, r, template, max_length)
        if all(label == IGNORE_INDEX for label in ex["labels"]):
            skipped += 1
            continue
        examples.append(ex)
    if skipped:
        log.warning("skipped %d records whose prompt is longer than %d tokens", skipped, max_length)
    return examples


def pad_batch(
    examples: Sequence[dict[str, Sequence[int]]], pad_token_id: int, side: str = "right"
) -> dict:
    """Pad encoded examples into a batch of LongTensors [batch, longest]: input_ids with
    `pad_token_id`, labels (when the examples have them) with IGNORE_INDEX, and attention_mask
    with 0 (ones over the tokens when an example has no mask).

    Training pads on the right; evaluation pads on the left, so that every prompt ends (and every
    generated or scored token starts) in the same column. The one pad helper of the project.
    """
    import torch  # deferred: the records and templates here are read without torch (the CLI)

    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(e["input_ids"]) for e in examples)
    fills = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    keys = [k for k in fills if k != "labels" or "labels" in examples[0]]
    batch = {}
    for key in keys:
        rows = []
        for e in examples:
            values = list(e[key]) if key in e else [1] * len(e["input_ids"])
            padding = [fills[key]] * (width - len(values))
            rows.append(padding + values if side == "left" else values + padding)
        batch[key] = torch.tensor(rows, dtype=torch.long).reshape(len(examples), width)
    return batch
