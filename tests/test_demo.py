"""The offline demo on the real SmolLM2-135M-Instruct (slow: loads and trains the real model)."""

import pytest

from qdiablo import cli

pytestmark = pytest.mark.slow


def test_demo_trains_and_reports_heldout_loss(tmp_path, capsys):
    code = cli.main(
        [
            "demo",
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--heldout",
            "4",
            "--max-length",
            "128",
            "--lr",
            "5e-3",
            "--output",
            str(tmp_path / "adapter"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    before = float(out.split("held-out response loss before:")[1].split()[0])
    after = float(out.split("held-out response loss after:")[1].split()[0])
    assert 0 < after < before
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
