"""eval.runner / eval.report: outputs, scoring through real generation, resume, reports."""

import json
import re

import pytest
import torch
from conftest import make_tiny_llama

from eval import report
from eval.math10k import Task, extract_number, resolve_tasks
from eval.runner import EvalSettings, evaluate
from qdiablo.data import MathRecord, encode_prompt
from qdiablo.errors import UserError

DIGITS = [ord(c) for c in "0123456789 ."]


def digit_model(tokenizer, seed=0):
    """A tiny float64 LLaMA whose output head can only say digits, spaces, dots and EOS, so its
    greedy responses hold numbers to extract."""
    model = make_tiny_llama(seed=seed, dtype=torch.float64, init_range=0.2)
    allowed = [
        tokenizer.convert_tokens_to_ids(
            tokenizer.convert_ids_to_tokens(
                tokenizer(chr(c), add_special_tokens=False)["input_ids"][0]
            )
        )
        for c in DIGITS
    ]
    allowed.append(tokenizer.eos_token_id)
    with torch.no_grad():
        w = model.lm_head.weight
        keep = torch.zeros(w.shape[0], dtype=torch.bool)
        keep[allowed] = True
        w[~keep] = 0.0
        w[keep] *= 5
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def hf_response(model, tokenizer, instruction, max_new_tokens):
    ids = torch.tensor([encode_prompt(tokenizer, instruction)])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=0,
            eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


QUESTIONS = [f"Question {i}: what is {i} + {i * 3}?" for i in range(7)]


@pytest.fixture(scope="module")
def setup(tokenizer):
    model = digit_model(tokenizer)
    responses = [hf_response(model, tokenizer, q, 12) for q in QUESTIONS]
    assert sum(extract_number(r) is not None for r in responses) >= 5, responses
    # Labels: the reference's reading of the real response for even items, a wrong one for odd.
    labels = [
        (extract_number(r) if i % 2 == 0 and extract_number(r) else "-7")
        for i, r in enumerate(responses)
    ]
    records = tuple(
        MathRecord(q, "The answer is 1.", a, f"t:{i}")
        for i, (q, a) in enumerate(zip(QUESTIONS, labels))
    )
    task = Task("digits", records, "number", "custom", "memory")
    return model, responses, labels, task


SETTINGS = EvalSettings(max_new_tokens=12, batch_size=3)


def test_scores_real_generations_like_the_reference(setup, tokenizer, tmp_path):
    model, responses, labels, task = setup
    summary = evaluate(model, tokenizer, [task], tmp_path, SETTINGS, progress=False)
    rows = sorted(report.read_jsonl(tmp_path / "digits.jsonl"), key=lambda r: r["index"])
    assert [r["response"] for r in rows] == responses  # batched == one at a time
    expected = [
        abs(float(lab) - float(re.findall(r"-?\d+\.?\d*", r.replace(",", ""))[-1])) <= 1e-3
        if re.findall(r"-?\d+\.?\d*", r)
        else False
        for r, lab in zip(responses, labels)
    ]
    assert [r["correct"] for r in rows] == expected
    assert any(expected) and not all(expected)
    t = summary["tasks"]["digits"]
    assert t["correct"] == sum(expected) and t["n"] == len(QUESTIONS)
    assert t["accuracy"] == pytest.approx(100 * sum(expected) / len(QUESTIONS))
    assert set(rows[0]) >= {"index", "prompt", "response", "extracted", "label", "correct"}
    assert rows[0]["prompt"].startswith("Below is an instruction")
    assert t["nll"] > 0 and t["nll_tokens"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "Custom test files" in md and "| digits | 7 |" in md
    assert json.loads((tmp_path / "summary.json").read_text())["tasks"]["digits"]["n"] == 7


def test_resume_skips_finished_examples_and_repairs_a_partial_line(setup, tokenizer, tmp_path):
    model, _, _, task = setup
    first = evaluate(model, tokenizer, [task], tmp_path, SETTINGS, progress=False)
    gen, nll = tmp_path / "digits.jsonl", tmp_path / "digits.nll.jsonl"
    full_gen, full_nll = gen.read_text().splitlines(True), nll.read_text().splitlines(True)
    assert len(full_gen) == len(full_nll) == 7
    # An interruption: three finished lines, then half of a fourth.
    gen.write_text("".join(full_gen[:3]) + full_gen[3][: len(full_gen[3]) // 2])
    nll.write_text("".join(full_nll[:5]) + full_nll[5][:10])
    again = evaluate(model, tokenizer, [task], tmp_path, SETTINGS, progress=False)
    assert again["timing"]["digits"]["generate"]["generated"] == 4
    assert again["timing"]["digits"]["nll"]["computed"] == 2
    lines = gen.read_text().splitlines(True)
    assert lines[:3] == full_gen[:3]  # finished lines untouched
    assert sorted(lines, key=lambda s: json.loads(s)["index"]) == sorted(
        full_gen, key=lambda s: json.loads(s)["index"]
    )  # the redone examples come out the same
    assert again["tasks"] == first["tasks"]
    # Nothing left to do: nothing is generated.
    third = evaluate(model, tokenizer, [task], tmp_path, SETTINGS, progress=False)
    assert third["timing"]["digits"]["generate"]["generated"] == 0
    # A larger limit only does the new items.
    bigger = Task("digits", task.records + task.records[:2], "number", "custom", "memory")
    fourth = evaluate(model, tokenizer, [bigger], tmp_path, SETTINGS, progress=False)
    assert fourth["timing"]["digits"]["generate"]["generated"] == 2


def test_resume_refuses_other_settings_and_corruption(setup, tokenizer, tmp_path):
    model, _, _, task = setup
    small = EvalSettings(max_new_tokens=3, batch_size=4, nll=False)
    evaluate(model, tokenizer, [task], tmp_path, small, progress=False)
    with pytest.raises(UserError, match=r"another evaluation .*max_new_tokens: 3 → 4"):
        evaluate(
            model,
            tokenizer,
            [task],
            tmp_path,
            EvalSettings(max_new_tokens=4, nll=False),
            progress=False,
        )
    with pytest.raises(UserError, match="model"):
        evaluate(
            model, tokenizer, [task], tmp_path, small, model_info={"base": "other"}, progress=False
        )
    # A bad line in the middle is corruption, not an interruption.
    gen = tmp_path / "digits.jsonl"
    lines = gen.read_text().splitlines(True)
    gen.write_text(lines[0] + "{oops\n" + "".join(lines[1:]))
    with pytest.raises(UserError, match=r"digits.jsonl: line 2 is not a valid record"):
        evaluate(model, tokenizer, [task], tmp_path, small, progress=False)
    out = evaluate(model, tokenizer, [task], tmp_path, small, overwrite=True, progress=False)
    assert out["timing"]["digits"]["generate"]["generated"] == 7


def test_read_jsonl_repairs_only_the_tail(tmp_path):
    path = tmp_path / "x.jsonl"
    report.append_jsonl(path, [{"index": 0}, {"index": 1}])
    with open(path, "a") as f:
        f.write('{"index": 2, "resp')
    assert report.read_jsonl(path) == [{"index": 0}, {"index": 1}]
    assert path.read_text() == '{"index": 0}\n{"index": 1}\n'
    report.append_jsonl(path, [{"index": 2}])
    assert [r["index"] for r in report.read_jsonl(path)] == [0, 1, 2]
    assert report.read_jsonl(tmp_path / "missing.jsonl") == []


def test_letter_task_reports_both_rules_and_the_mean(tokenizer, tmp_path):
    model = make_tiny_llama(seed=0)
    tasks = resolve_tasks(["AQuA", "mawps", "AddSub"])
    summary = evaluate(
        model,
        tokenizer,
        tasks,
        tmp_path,
        EvalSettings(max_new_tokens=2, limit=2, batch_size=2),
        progress=False,
    )
    aqua = summary["tasks"]["AQuA"]
    assert aqua["kind"] == "letter" and "accuracy_strict" in aqua and aqua["n"] == 2
    assert aqua["n_total"] == 254
    rows = report.read_jsonl(tmp_path / "AQuA.jsonl")
    assert {"extracted_strict", "correct_strict"} <= set(rows[0])
    mean = summary["mean"]
    assert mean["tasks"] == ["mawps", "AQuA"] and not mean["complete"]
    assert mean["accuracy"] == pytest.approx(
        (aqua["accuracy"] + summary["tasks"]["mawps"]["accuracy"]) / 2
    )
    md = (tmp_path / "results.md").read_text()
    assert "mean (2 of 4 tasks)" in md and "Reported apart" in md
    assert md.index("Reported apart") < md.index("| AddSub |")


def test_settings_are_checked():
    with pytest.raises(UserError, match="unknown preset"):
        EvalSettings(preset="nope").resolved()
    with pytest.raises(UserError, match="nothing to do"):
        EvalSettings(generate=False, nll=False).resolved()
    r = EvalSettings(preset="llm-adapters").resolved()
    assert (r["template"], r["num_beams"], r["max_new_tokens"]) == ("llm-adapters", 4, 256)
    r = EvalSettings().resolved()
    assert (r["template"], r["num_beams"], r["max_new_tokens"]) == ("alpaca", 1, 512)
    assert EvalSettings(preset="chat", max_new_tokens=5).resolved()["template"] == "chat"
