"""`qdiablo quantize` end to end on a tiny saved model, and the calibration helper."""

import json

import torch
import yaml

from qdiablo import cli
from qdiablo.calibration import build_calibration_data, calibration_texts
from qdiablo.data import ALPACA_TEMPLATE
from quantizers import QuantLinear, load_quantized

PARAGRAPH = (
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
    "muffins for her friends every day with four. She sells the remainder at the market daily."
)


def test_quantize_verb_writes_a_loadable_gptq_folder(tiny_model_dir, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join([PARAGRAPH] * 20))
    out = tmp_path / "w4"
    argv = [
        "quantize",
        "--model",
        str(tiny_model_dir),
        "--output",
        str(out),
        "--bits",
        "4",
        "--group-size",
        "32",
        "--calib",
        str(calib),
        "--calib-samples",
        "8",
        "--calib-seq-len",
        "64",
        "--magr",
        "--checkpoint-format",
        "gptq_v2",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "quantized 14 layers to 4 bits (group size 32, gptq + MagR)" in printed
    model = load_quantized(out)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    qc = json.loads((out / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["checkpoint_format"]) == (4, 32, "gptq_v2")
    assert qc["meta"]["qdiablo"]["magr"] is True
    assert (out / "tokenizer.json").is_file() and (out / "quantization_report.md").is_file()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 50, 60, 70]])).logits).all()


def test_quantize_verb_with_yaml_config_and_math10k_calibration(tiny_model_dir, tmp_path):
    records = [
        {
            "instruction": f"What is {i} + {i}?",
            "input": "",
            "output": f"{i} + {i} = {2 * i}. The answer is {2 * i}.",
            "answer": str(2 * i),
        }
        for i in range(40)
    ]
    data = tmp_path / "math.json"
    data.write_text(json.dumps(records))
    config = tmp_path / "q.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model_dir),
                "output": str(tmp_path / "w3"),
                "bits": 3,
                "method": "rtn",
                "group_size": -1,
                "calib": str(data),
                "calib_samples": 4,
                "calib_seq_len": 64,
            }
        )
    )
    assert cli.main(["quantize", "--config", str(config), "--bits", "2"]) == 0
    assert json.loads((tmp_path / "w3" / "quantize_config.json").read_text())["bits"] == 2
    report = json.loads((tmp_path / "w3" / "quantization_report.json").read_text())
    assert report["calibration_tokens"] == 4 * 64  # RTN with data: errors are reported
    assert all(layer["rel_error"] > 0 for layer in report["layers"])


def test_bad_options_are_one_line_errors(tiny_model_dir, tmp_path, capsys):
    base = ["quantize", "--model", str(tiny_model_dir), "--output", str(tmp_path / "o")]
    assert cli.main([*base, "--group-size", "48"]) == 2
    err = capsys.readouterr().err
    assert "qdiablo: error: --group-size: expected -1 (per channel) or a power of two" in err
    assert cli.main([*base, "--calib", str(tmp_path / "missing.txt")]) == 2
    assert "calibration file not found" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert cli.main([*base, "--calib", str(empty)]) == 2
    assert "the calibration text file is empty" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_default_calibration_is_the_shipped_math10k_subset(tokenizer):
    texts = calibration_texts()
    assert len(texts) > 1000
    assert texts[0].startswith(ALPACA_TEMPLATE.split("{")[0])
    batches = build_calibration_data(tokenizer, num_samples=6, seq_len=32, batch_size=4)
    assert [tuple(b.shape) for b in batches] == [(4, 32), (2, 32)]


def test_default_calibration_never_holds_an_evaluated_item():
    """With reconstruction, calibration trains the base: the shipped subset's records that are
    test items of the evaluated sets (12 mawps overlaps) must not be in it."""
    from qdiablo.data import EVAL_SETS, load_shipped_train_records, load_test_set

    tested = {" ".join(r.instruction.lower().split()) for n in EVAL_SETS for r in load_test_set(n)}
    shipped = load_shipped_train_records()
    overlapping = [r for r in shipped if " ".join(r.instruction.lower().split()) in tested]
    assert overlapping  # the check below can fail: the shipped subset does hold test items
    texts = calibration_texts()
    assert len(texts) == len(shipped) - len(overlapping)
    for r in overlapping:
        assert not any(r.instruction in t for t in texts)
