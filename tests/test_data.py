"""qdiablo.data: record loading and its errors, templates, decontamination, tokenization."""

import json

import pytest

from qdiablo.data import (
    ALL_SETS,
    IGNORE_INDEX,
    LLM_ADAPTERS_TEMPLATE,
    MathRecord,
    build_prompt,
    decontaminate,
    encode_example,
    encode_prompt,
    load_shipped_train_records,
    load_test_set,
    pad_batch,
    read_records,
    with_answer_suffix,
)
from qdiablo.errors import UserError


def test_vendored_test_sets_have_the_published_sizes():
    sizes = {name: len(load_test_set(name)) for name in ALL_SETS}
    assert sizes == {
        "gsm8k": 1319,
        "SVAMP": 1000,
        "mawps": 238,
        "AQuA": 254,
        "AddSub": 395,
        "MultiArith": 600,
        "SingleEq": 508,
    }
    assert all(r.answer in "ABCDE" for r in load_test_set("aqua"))


def test_shipped_training_subset_is_the_distinct_union():
    records = load_shipped_train_records()
    assert len(records) == 1824
    assert len({(r.instruction, r.output, r.answer) for r in records}) == 1824


def test_decontamination_drops_the_known_overlaps():
    train = load_shipped_train_records()
    tests = {name: load_test_set(name) for name in ("gsm8k", "SVAMP", "mawps", "AQuA", "AddSub")}
    kept, dropped = decontaminate(train, tests)
    assert dropped["gsm8k"] == dropped["SVAMP"] == dropped["AQuA"] == 0
    assert dropped["mawps"] >= 11 and dropped["AddSub"] >= 108
    assert len(kept) == len(train) - len(train) + len(kept)  # kept is a subset
    test_keys = {" ".join(r.instruction.lower().split()) for v in tests.values() for r in v}
    assert not any(" ".join(r.instruction.lower().split()) in test_keys for r in kept)


@pytest.mark.parametrize("fmt", ["array", "jsonl"])
def test_reads_json_array_and_jsonl(tmp_path, fmt):
    items = [{"instruction": f"q{i}", "input": "", "output": "o", "answer": "1"} for i in range(3)]
    path = tmp_path / "d.json"
    if fmt == "array":
        path.write_text(json.dumps(items))
    else:
        path.write_text("\n".join(json.dumps(x) for x in items) + "\n")
    assert [r.instruction for r in read_records(path)] == ["q0", "q1", "q2"]


def test_schema_errors_name_file_record_and_field(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            [
                {"instruction": "a", "output": "b", "answer": "1"},
                {"instruction": "c", "output": "d"},
            ]
        )
    )
    with pytest.raises(UserError, match=r"bad\.json: record 1: missing field 'answer'"):
        read_records(path)
    path.write_text('{"instruction": "a", "output": "b", "answer": "1"}\n{"instruction": ')
    with pytest.raises(UserError, match=r"bad\.json: line 2 \(record 1\)"):
        read_records(path)
    with pytest.raises(UserError, match="not found"):
        read_records(tmp_path / "missing.json")


def test_answer_suffix_is_added_only_when_missing():
    r = MathRecord("q", "2 + 2 = 4.", "4.0")
    assert with_answer_suffix(r).output == "2 + 2 = 4.\nThe answer is 4."
    stated = MathRecord("q", "So the answer is 4.", "4")
    assert with_answer_suffix(stated) == stated


def test_llm_adapters_template_keeps_its_indentation():
    prompt = build_prompt("Add 2 and 2.", "llm-adapters")
    assert prompt == LLM_ADAPTERS_TEMPLATE.format(instruction="Add 2 and 2.")
    assert "request. \n\n                ### Instruction:\n                Add 2 and 2." in prompt


def test_loss_is_on_the_response_only_and_ends_with_eos(tokenizer):
    r = MathRecord("What is 2+2?", "It is 4.", "4")
    ex = encode_example(tokenizer, r)
    prompt_ids = encode_prompt(tokenizer, r.instruction)
    assert ex["input_ids"][: len(prompt_ids)] == prompt_ids
    assert ex["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    response = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response[:-1]) == "It is 4."
    short = encode_example(tokenizer, r, max_length=len(prompt_ids) + 2)
    assert len(short["input_ids"]) == len(prompt_ids) + 2


def test_chat_template_prompt(tokenizer):
    prompt = build_prompt("hi", "chat", tokenizer)
    assert prompt.endswith("<|im_start|>assistant\n") and "hi" in prompt
    with pytest.raises(UserError):
        build_prompt("hi", "nope")


def test_pad_batch_pads_labels_with_ignore_index(tokenizer):
    a = encode_example(tokenizer, MathRecord("a", "b", "1"))
    b = encode_example(tokenizer, MathRecord("a much longer question", "b", "1"))
    batch = pad_batch([a, b], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape
    assert (batch["labels"][0, len(a["labels"]) :] == IGNORE_INDEX).all()
    assert batch["attention_mask"][0].sum() == len(a["input_ids"])


def test_left_padding_mirrors_right_padding(tokenizer):
    """Evaluation's left padding holds the same tokens as training's right padding, shifted so
    that every row ends in the last column; a prompt without labels gets ids and a mask only."""
    examples = [
        encode_example(tokenizer, MathRecord(q, "b", "1")) for q in ("a", "a much longer one")
    ]
    right = pad_batch(examples, tokenizer.pad_token_id)
    left = pad_batch(examples, tokenizer.pad_token_id, side="left")
    for row, e in enumerate(examples):
        n, width = len(e["input_ids"]), right["input_ids"].shape[1]
        for key in ("input_ids", "labels", "attention_mask"):
            assert left[key][row, width - n :].tolist() == right[key][row, :n].tolist()
        assert (left["labels"][row, : width - n] == IGNORE_INDEX).all()
        assert (left["input_ids"][row, : width - n] == tokenizer.pad_token_id).all()
        assert left["attention_mask"][row].sum() == n
    prompts = pad_batch([{"input_ids": [5, 6]}, {"input_ids": [7]}], 0, side="left")
    assert set(prompts) == {"input_ids", "attention_mask"}
    assert prompts["input_ids"].tolist() == [[5, 6], [0, 7]]
    assert prompts["attention_mask"].tolist() == [[1, 1], [0, 1]]
