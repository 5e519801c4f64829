"""Bad input through the CLI: each case exits 2 with one error line naming the file, field, flag
or layer, before any model loads where it can, and leaves the files already there byte-identical.

Most cases call `qdiablo.cli.main` (what `python -m qdiablo` runs) in this process, to keep the
suite fast; the cases that depend on a fresh process (the exit status, a lock held by another
process, no hub access) run `python -m qdiablo` as a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, make_tokenizer
from safetensors.torch import save_file

from qdiablo import DiaBloConfig, cli, get_diablo_model
from qdiablo.outputs import LOCK_NAME
from quantizers import QuantConfig, quantize_model, save_quantized

REPO = Path(__file__).resolve().parents[1]
RECORD = {"instruction": "What is 2 + 3?", "input": "", "output": "2 + 3 = 5.", "answer": "5"}
EVAL = ["--tasks", "SVAMP", "--limit", "1", "--nll-only", "--no-progress"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def error_line(err: str) -> str:
    """The one `qdiablo: error:` line (argparse's own errors read `qdiablo <verb>: error:`)."""
    lines = [line for line in err.splitlines() if ": error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """A user's folder: data files (good and bad), a quantized base, adapters, an export-like
    folder without its manifest. Every case runs against it and must leave it unchanged."""
    root = tmp_path_factory.mktemp("world")
    data = root / "data"
    data.mkdir()
    (data / "good.json").write_text(json.dumps([RECORD] * 4))
    (data / "malformed.json").write_text('[{"instruction": "x",')
    (data / "badline.jsonl").write_text(json.dumps(RECORD) + "\n{oops\n")
    for field in ("output", "answer", "instruction"):
        rec = {k: v for k, v in RECORD.items() if k != field}
        (data / f"no_{field}.json").write_text(json.dumps([RECORD, rec]))
    (data / "empty.json").write_text("")
    (data / "emptylist.json").write_text("[]")
    (data / "latin1.json").write_bytes(
        json.dumps([RECORD]).replace("2 + 3", "2 é 3").encode("latin-1")
    )
    (root / "bad.yaml").write_text("num-blocks: [1\n")
    (root / "unknown.yaml").write_text("num-blockz: 4\n")
    (root / "zero.yaml").write_text("num_blocks: 0\n")
    (root / "float.yaml").write_text("max-steps: 1.5\n")

    model = quantize_model(
        make_tiny_llama(), None, QuantConfig(method="rtn", bits=4, group_size=32)
    )
    save_quantized(model, root / "q4", make_tokenizer())
    other = make_tiny_llama(seed=7)
    get_diablo_model(other, DiaBloConfig(num_blocks=4)).save_pretrained(root / "other_adapter")
    own = get_diablo_model(make_tiny_llama(), DiaBloConfig(num_blocks=4))
    own.save_pretrained(root / "truncated_adapter")
    weights = root / "truncated_adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])

    bits = root / "q4_bits"  # the top-level bits GPTQModel reads disagree with qdiablo's own
    bits.mkdir()
    for p in (root / "q4").iterdir():
        (bits / p.name).write_bytes(p.read_bytes())
    for name in ("config.json", "quantize_config.json"):
        cfg = json.loads((bits / name).read_text())
        (cfg["quantization_config"] if name == "config.json" else cfg)["bits"] = 8
        (bits / name).write_text(json.dumps(cfg))
    foreign = root / "q4_foreign"
    foreign.mkdir()
    for p in (root / "q4").iterdir():
        (foreign / p.name).write_bytes(p.read_bytes())
    save_file({"x": torch.ones(1)}, foreign / "model-00002-of-00002.safetensors")

    export = root / "export"  # an export whose manifest.json was deleted
    (export / "base").mkdir(parents=True)
    for p in (root / "q4").iterdir():
        (export / "base" / p.name).write_bytes(p.read_bytes())
    (export / "adapter").mkdir()
    (export / "README.md").write_text("card")
    (root / "precious").mkdir()
    (root / "precious" / "thesis.txt").write_text("mine")
    return root


def run_case(world, capsys, argv, rc, *needles):
    before = snapshot(world)
    assert cli.main([str(a) for a in argv]) == rc
    err = capsys.readouterr().err
    line = error_line(err)
    for needle in needles:
        assert str(needle) in line, (needle, line)
    assert snapshot(world) == before
    run_case.last_stderr = err
    return line


def train(world, model, *extra):
    return ["train", "--model", model, "--decontaminate", "none", "--max-steps", "1", *extra]


def test_bad_training_data(world, tiny_model_dir, capsys, tmp_path):
    d = world / "data"
    out = ["--output", tmp_path / "t"]
    cases = [
        (d / "malformed.json", "malformed.json"),
        (d / "badline.jsonl", "badline.jsonl"),
        (d / "no_output.json", "'output'"),
        (d / "no_answer.json", "'answer'"),
        (d / "no_instruction.json", "'instruction'"),
        (d / "empty.json", "empty.json"),
        (d / "emptylist.json", "emptylist.json"),
        (d / "missing.json", "missing.json"),
        (d / "latin1.json", "latin1.json: not a UTF-8 text file"),
    ]
    for path, needle in cases:
        run_case(world, capsys, [*train(world, tiny_model_dir, "--data", path), *out], 2, needle)
        assert not (tmp_path / "t").exists()


def test_bad_training_settings(world, tiny_model_dir, capsys, tmp_path):
    good = ["--data", world / "data" / "good.json", "--output", tmp_path / "t"]
    base = train(world, tiny_model_dir, *good)
    run_case(world, capsys, [*base, "--num-blocks", "0"], 2, "--num-blocks 0: must be ≥ 1")
    run_case(world, capsys, [*base, "--adapter", "lora", "--rank", "0"], 2, "--rank 0")
    run_case(world, capsys, [*base, "--max-steps", "0"], 2, "--max-steps 0")
    run_case(world, capsys, [*base, "--lr", "0"], 2, "--lr 0")
    run_case(world, capsys, [*base, "--batch-size", "0"], 2, "--batch-size 0")
    run_case(
        world, capsys, [*base, "--config", world / "zero.yaml"], 2, "zero.yaml: key 'num-blocks'"
    )
    run_case(
        world, capsys, [*base, "--config", world / "float.yaml"], 2, "float.yaml: key 'max-steps'"
    )
    run_case(world, capsys, [*base, "--config", world / "bad.yaml"], 2, "bad.yaml: malformed YAML")
    run_case(
        world, capsys, [*base, "--config", world / "unknown.yaml"], 2, "unknown key 'num-blockz'"
    )
    line = run_case(world, capsys, [*base, "--num-blocks", "7"], 2, "--num-blocks 7", "layer '")
    assert "valid N nearby: " in line
    assert not (tmp_path / "t").exists()


def test_bad_quantize_settings(world, tiny_model_dir, capsys, tmp_path, monkeypatch):
    base = ["quantize", "--model", tiny_model_dir, "--method", "rtn", "--output", tmp_path / "q"]
    with pytest.raises(SystemExit) as e:  # argparse's own choices check
        cli.main([str(a) for a in [*base, "--bits", "5"]])
    assert e.value.code == 2 and "--bits" in error_line(capsys.readouterr().err)
    run_case(world, capsys, [*base, "--group-size", "0"], 2, "--group-size")
    run_case(world, capsys, [*base, "--calib-samples", "0"], 2, "--calib-samples 0")
    run_case(world, capsys, [*base[:-1], world / "precious"], 2, "precious", "did not write")
    monkeypatch.chdir(world / "precious")
    run_case(world, capsys, [*base[:-1], "."], 2, "--output . is the current folder")
    assert not (tmp_path / "q").exists()


def test_bad_eval_inputs(world, tiny_model_dir, capsys, tmp_path):
    out = ["--output", tmp_path / "e"]
    ev = ["eval", *EVAL, *out]
    run_case(world, capsys, [*ev, "--model", tiny_model_dir, "--limit", "0"], 2, "--limit")
    run_case(
        world, capsys, [*ev[:1], "--tasks", "gsm9k", *out, "--model", tiny_model_dir], 2, "gsm9k"
    )
    adapter = ["--model", tiny_model_dir, "--adapter"]
    run_case(world, capsys, [*ev, *adapter, world / "other_adapter"], 2, "different base")
    assert "--force" not in run_case.last_stderr.replace("qdiablo eval --force", "")
    run_case(
        world, capsys, [*ev, *adapter, world / "truncated_adapter"], 2, "adapter_model.safetensors"
    )
    run_case(world, capsys, [*ev, "--model", world / "q4_bits"], 2, "top-level bits=8", "bits=4")
    run_case(world, capsys, [*ev, "--model", world / "q4_foreign"], 2, "model-00002-of-00002")
    run_case(world, capsys, [*ev, "--model", world / "export"], 2, "manifest missing")
    run_case(world, capsys, [*ev, "--model", world / "data" / "nope"], 2, "not found:")


def _subprocess(args, cwd=None, **env):
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "qdiablo", *map(str, args)],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_in_a_fresh_process(world, tiny_model_dir, tmp_path):
    """Exit status and stderr of the real command: a mistyped path never reaches for the hub,
    a hub-like name with no network says so at once, a held folder refuses a second writer."""
    before = snapshot(world)
    (world / "runs").mkdir(exist_ok=True)
    proc = _subprocess(["quantize", "--model", "runs/nope", "--output", tmp_path / "q"], cwd=world)
    assert (
        proc.returncode == 2 and error_line(proc.stderr) == "qdiablo: error: not found: runs/nope"
    )
    (world / "runs").rmdir()
    proc = _subprocess(
        ["quantize", "--model", "someorg/nomodel", "--output", tmp_path / "q"],
        HF_HUB_OFFLINE="1",
    )
    line = error_line(proc.stderr)
    assert proc.returncode == 2 and "'someorg/nomodel' is neither a local folder" in line
    out = tmp_path / "e"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid, "verb": "eval"}))
        proc = _subprocess(["eval", *EVAL, "--model", tiny_model_dir, "--output", out])
        assert proc.returncode == 2 and f"in use by process {sleeper.pid}" in error_line(
            proc.stderr
        )
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not (tmp_path / "q").exists() and snapshot(world) == before
