"""The offline demo on the real SmolLM2-135M-Instruct, shortened (slow: quantizes, trains and
evaluates the real model), and its resume: a second run skips every stage."""

import json

import pytest

from qdiablo import cli
from qdiablo.commands.demo import available_cores
from qdiablo.export import load_exported

pytestmark = pytest.mark.slow

SHORT = ["--calib-samples", "8", "--recon-steps", "3", "--steps", "4", "--limit", "1"]
SHORT += ["--max-new-tokens", "24"]


def test_short_demo_runs_the_pipeline_and_resumes(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    assert cli.main(["demo", "--output", str(out_dir), *SHORT]) == 0
    out = capsys.readouterr().out
    assert "| task | quantized base | + DiaBlo |" in out
    for task in ("gsm8k", "SVAMP", "mawps", "AQuA"):
        assert f"| {task} |" in out
    base = json.loads((out_dir / "eval-base" / "summary.json").read_text())
    tuned = json.loads((out_dir / "eval" / "summary.json").read_text())
    assert base["settings"]["limit"] == tuned["settings"]["limit"] == 1
    # Training lowers the reference-response NLL of the 2-bit base on the held-out test items.
    mean = lambda s: sum(t["nll"] for t in s["tasks"].values()) / len(s["tasks"])  # noqa: E731
    assert mean(tuned) < mean(base)
    # ... distilled from the full-precision model, the demo's default.
    trained = json.loads((out_dir / "train" / "train_results.json").read_text())
    assert trained["distill"] == "smollm2"
    report = json.loads((out_dir / "quantized" / "quantization_report.json").read_text())
    assert len(report["reconstruction"]) == 30  # every block went through reconstruction
    card = (out_dir / "export" / "README.md").read_text()
    assert "2" in card and "MagR" in card
    model = load_exported(out_dir / "export")
    assert sum(p.numel() for n, p in model.named_parameters() if "blocks" in n) > 0
    # Each stage ran in its own process with the demo's thread count (default: the cores this
    # process may use); its marker holds that process's peak RSS.
    for stage in ("quantize", "eval-base", "train", "eval", "export"):
        marker = json.loads((out_dir / "stages" / f"{stage}.json").read_text())
        assert marker["peak_rss_of"] == "stage process"
        assert marker["threads"] == available_cores()
        assert marker["peak_rss_mib"] > 100, stage

    assert cli.main(["demo", "--output", str(out_dir), *SHORT]) == 0
    statuses = {
        line.split()[0]: line.split()[1]
        for line in capsys.readouterr().out.splitlines()
        if line.split()[:1] in (["quantize"], ["eval-base"], ["train"], ["eval"], ["export"])
        and len(line.split()) == 4
    }
    assert statuses == dict.fromkeys(
        ["quantize", "eval-base", "train", "eval", "export"], "skipped"
    )
