"""eval.math10k: answer extraction on real response shapes, fuzzing, task loading and its errors."""

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eval.math10k import (
    CUSTOM,
    EXTRA,
    LETTER,
    MAIN,
    NUMBER,
    extract_letter,
    extract_letter_strict,
    extract_number,
    number_correct,
    resolve_tasks,
    score_response,
)
from qdiablo.errors import UserError


def reference_number(sentence: str) -> float:
    """LLM-Adapters' / ApiQ's extract_answer_number, restated: the independent reference."""
    sentence = sentence.replace(",", "")
    pred = re.findall(r"-?\d+\.?\d*", sentence)
    if not pred:
        return float("inf")
    return float(pred[-1])


def reference_letter(sentence: str) -> str:
    """LLM-Adapters' extract_answer_letter, restated."""
    found = re.findall(r"A|B|C|D|E", sentence.strip())
    return found[0] if found else ""


# (response, label, extracted, correct): shapes seen in real generations and test outputs.
NUMBER_CASES = [
    ("The total is 1,234.5 dollars.", "1234.5", "1234.5", True),
    ("She has -3 apples left.", "-3", "-3", True),
    ("It costs $5", "5.0", "5", True),
    ("So the answer is 5.", "5", "5.", True),
    ("3/4", "0.75", "4", False),  # reads 4, as in the reference
    ("3/4", "4", "4", True),
    ("The answer is 7.", "7.0", "7.", True),
    ("#### 72", "72", "72", True),
    ("He walks 12 km/h for 3 hours, so 36 km.", "36", "36", True),
    ("First 2 + 3 = 5, then 5 * 4 = 20. The answer is 20 apples.", "20", "20", True),
    ("I don't know.", "4", None, False),
    ("", "4", None, False),
    ("The answer is 1.8333", "1.8333333333333335", "1.8333", True),  # mawps: within 1e-3
    ("The answer is 1.83", "1.8333333333333335", "1.83", False),
    ("10,000 people", "10000.0", "10000", True),
    ("0.5 of the cake", ".5", "0.5", True),
    ("Answer: 18 eggs\n\n### Instruction:\nTom has 4 cats", "18", "4", False),  # last number
    ("The answer is 1e5", "5", "5", True),  # no exponent: reads 5
    ("x = -0.25", "-0.25", "-0.25", True),
    ("-", "0", None, False),
]


@pytest.mark.parametrize("response, label, extracted, correct", NUMBER_CASES)
def test_number_extraction_table(response, label, extracted, correct):
    assert extract_number(response) == extracted
    s = score_response(NUMBER, response, label)
    assert (s.extracted, s.correct) == (extracted, correct)
    # Agrees with the reference's own arithmetic.
    assert correct == (abs(float(label) - reference_number(response)) <= 0.001)


LETTER_CASES = [
    # (response, label, reference letter, strict letter)
    ("Answer: (C)", "C", "A", "C"),  # the sloppy reference rule reads the A of "Answer"
    ("The answer is (C).", "C", "C", "C"),
    ("the answer is option B", "B", "B", "B"),
    ("So the answer is: E) 42", "E", "E", "E"),
    ("(D) 120", "D", "D", "D"),
    ("B) 7 km", "B", "B", "B"),
    ("C", "C", "C", "C"),
    ("Let x be the price. Then 4x = 12, x = 3.", "D", "", None),
    ("A train travels 60 km. The answer is (D).", "D", "A", "D"),
    ("Answer Choices: (A) 1 (B) 2", "B", "A", None),  # echoing the choices commits to nothing
    ("Rationale: 2 + 2 = 4. Answer: choice (E)", "E", "A", "E"),
    ("the answer is a number", "A", "", None),
    ("A. 23.65\nB. 1000\nC. 35.62", "A", "A", None),  # lists the options, picks none
    ("(B) 12\nBecause 3 * 4 = 12.", "B", "B", "B"),  # lowercase "a" is not an option letter
    ("", "A", "", None),
]


@pytest.mark.parametrize("response, label, ref, strict", LETTER_CASES)
def test_letter_extraction_table(response, label, ref, strict):
    assert (extract_letter(response) or "") == ref == reference_letter(response)
    assert extract_letter_strict(response) == strict
    s = score_response(LETTER, response, label)
    assert s.correct == (ref == label)
    assert s.correct_strict == (strict == label)


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_extraction_never_raises_and_matches_the_reference(text):
    got = extract_number(text)
    ref = reference_number(text)
    if got is None:
        assert ref == float("inf")
    else:
        assert float(got) == ref or (ref != ref and float(got) != float(got))
    assert (extract_letter(text) or "") == reference_letter(text)
    strict = extract_letter_strict(text)
    assert strict is None or strict in "ABCDE"
    for kind, label in ((NUMBER, "3"), (LETTER, "C")):
        s = score_response(kind, text, label)
        assert isinstance(s.correct, bool)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.integers(-(10**12), 10**12).map(str),
            st.floats(allow_nan=False, allow_infinity=False).map(repr),
            st.sampled_from([",", ".", "-", "/", "$", " ", "answer is", "(C)", "\n", "####"]),
            st.text(max_size=5),
        ),
        max_size=12,
    ).map("".join),
    st.sampled_from(["3", "-2.5", "1.8333333333333335", "1e400", "nan", "x"]),
)
def test_number_scoring_fuzz_never_raises(text, label):
    s = score_response(NUMBER, text, label)
    assert isinstance(s.correct, bool)
    assert number_correct(s.extracted, label) == s.correct


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


def test_default_tasks_are_the_four_of_the_mean():
    tasks = resolve_tasks(None)
    assert [t.name for t in tasks] == ["gsm8k", "SVAMP", "mawps", "AQuA"]
    assert [t.group for t in tasks] == [MAIN] * 4
    assert [t.kind for t in tasks] == [NUMBER, NUMBER, NUMBER, LETTER]
    assert [len(t) for t in tasks] == [1319, 1000, 238, 254]


def test_groups_names_and_dedup():
    tasks = resolve_tasks(["svamp", "extra", "SVAMP", "aqua"])
    assert [t.name for t in tasks] == ["SVAMP", "AddSub", "MultiArith", "SingleEq", "AQuA"]
    assert [t.group for t in tasks] == [MAIN, EXTRA, EXTRA, EXTRA, MAIN]
    assert len(resolve_tasks(["all"])) == 7


def test_custom_task_file(tmp_path):
    path = tmp_path / "mine" / "test.json"
    path.parent.mkdir()
    items = [{"instruction": "1+1?", "input": "", "output": "", "answer": "2"}]
    path.write_text(json.dumps(items))
    (task,) = resolve_tasks([str(path)])
    assert (task.name, task.group, task.kind, len(task)) == ("mine", CUSTOM, NUMBER, 1)
    letters = tmp_path / "letters.jsonl"
    letters.write_text('{"instruction": "pick", "answer": "B"}\n')
    assert resolve_tasks([str(letters)])[0].kind == LETTER


def test_unknown_task_names_the_choices():
    with pytest.raises(UserError, match="unknown task 'gsm9k'") as e:
        resolve_tasks(["gsm9k"])
    assert "SVAMP" in e.value.hint


def test_missing_test_file():
    with pytest.raises(UserError, match=r"test file not found: nope/test\.json"):
        resolve_tasks(["nope/test.json"])


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"instruction": "q", "answer": "1"},', "malformed JSON"),
        ('{"instruction": "q", "answer": "1"}\n{"instruction": "q2"\n', "line 2 (record 1)"),
        ('[{"instruction": "q", "answer": "1"}, {"instruction": "q2"}]', "record 1: missing"),
        ('[{"instruction": "q", "answer": ""}]', "record 0: field 'answer' is empty"),
        ('[{"instruction": "q", "answer": "1"}, {"instruction": "r", "answer": "x"}]', "record 1"),
        ("[]", "no records"),
    ],
)
def test_malformed_test_files_name_file_and_record(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError, match=re.escape(message)) as e:
        resolve_tasks([str(path)])
    assert "bad.json" in str(e.value)
