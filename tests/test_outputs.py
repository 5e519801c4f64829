"""Output folders: a verb never deletes what it did not write, one writer at a time, crash
leftovers cleaned, a training run killed early can start again, torn checkpoints are skipped."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qdiablo import cli
from qdiablo.errors import UserError
from qdiablo.outputs import LOCK_NAME, OutputFolder, marker_name

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every regular file under `folder` (bookkeeping aside), by relative path, with its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".qdiablo")
    }


def plant(folder: Path) -> dict[str, bytes]:
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "thesis.txt").write_text("x")
    (folder / "sub" / "notes.md").write_text("y")
    (folder / "train.jsonl").write_text('{"instruction": "mine"}\n')
    return snapshot(folder)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_output_folder_rules(tmp_path):
    out = tmp_path / "out"
    user = plant(out)
    with pytest.raises(UserError, match=r"did not write \(sub, thesis.txt, train.jsonl\)"):
        OutputFolder(out, "quantize").open()
    assert snapshot(out) == user and not (out / LOCK_NAME).exists()
    assert sorted(p.name for p in out.iterdir()) == ["sub", "thesis.txt", "train.jsonl"]

    with OutputFolder(out, "quantize", overwrite=True) as folder:
        folder.claim(["model.safetensors"])
        (out / "model.safetensors").write_bytes(b"w")
        assert json.loads(folder.marker.read_text())["complete"] is False
        folder.finish()
    marker = json.loads((out / marker_name("quantize")).read_text())
    assert marker["complete"] is True and marker["files"] == ["model.safetensors"]
    assert not (out / LOCK_NAME).exists()
    # Its own earlier output is not foreign: a second run replaces it, the user's files stay.
    with OutputFolder(out, "quantize", overwrite=True) as folder:
        folder.claim(["config.json"])
        (out / "config.json").write_text("{}")
        folder.finish()
    assert not (out / "model.safetensors").exists()  # the earlier run's, not written again
    assert {k: v for k, v in snapshot(out).items() if k != "config.json"} == user
    # Another verb's output is foreign to this one.
    with pytest.raises(UserError, match="`qdiablo eval` did not write"):
        OutputFolder(out, "eval").open()
    # One rule for every verb: a finished output is replaced only with --overwrite.
    for verb in ("quantize", "export"):
        with OutputFolder(tmp_path / verb, verb) as folder:
            folder.finish()
        with pytest.raises(UserError, match=f"already holds a finished `qdiablo {verb}`"):
            OutputFolder(tmp_path / verb, verb).open()
        assert json.loads((tmp_path / verb / marker_name(verb)).read_text())["complete"]
    # A failed run into a new folder leaves nothing behind.
    with pytest.raises(RuntimeError), OutputFolder(tmp_path / "new", "quantize"):
        raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()


def test_lock_refuses_a_live_writer_and_takes_over_a_dead_ones(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid, "verb": "train"}))
        with pytest.raises(UserError, match=f"in use by process {sleeper.pid}"):
            OutputFolder(out, "eval").open()
    finally:
        sleeper.kill()
        sleeper.wait()
    # The owner is gone: its lock and the temporary folders of its interrupted saves go.
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "verb": "quantize"}))
    (out / ".qdiablo-tmp-k3j2h1gf").mkdir()
    (out / ".qdiablo-tmp-k3j2h1gf" / "model.safetensors").write_bytes(b"partial")
    (out / ".train_config.json.abcd1234.tmp").mkdir()
    (tmp_path / ".out.x7y6z5w4.tmp").mkdir()  # beside: the old whole-folder swap's leftover
    (tmp_path / ".outer.x7y6z5w4.tmp").mkdir()  # another folder's: kept
    with OutputFolder(out, "quantize") as folder:
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        folder.finish()
    assert sorted(p.name for p in out.iterdir()) == [marker_name("quantize")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".outer.x7y6z5w4.tmp", "out"]


def test_current_folder_is_refused(tmp_path, monkeypatch, tiny_model_dir, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("keep")
    argv = ["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--output", "."]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--output . is the current folder" in err and err.count("\n") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
    with pytest.raises(UserError, match="above it"):
        OutputFolder(tmp_path.parent, "export").open()


def test_quantize_keeps_user_files(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "precious"
    user = plant(out)
    argv = ["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--bits", "4"]
    argv += ["--group-size", "32", "--output", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "holds files `qdiablo quantize` did not write" in err and "--overwrite" in err
    assert snapshot(out) == user
    assert cli.main([*argv, "--overwrite"]) == 0
    after = snapshot(out)
    assert {k: after[k] for k in user} == user and "model.safetensors" in after
    assert (out / marker_name("quantize")).is_file()
    # Created with the user's umask, as transformers does (not 0700 / 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert cli.main([*argv[:-2], "--output", str(tmp_path / "new")]) == 0
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o777 & ~umask


def test_eval_overwrite_removes_only_its_own_results(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "ev"
    user = plant(out)
    argv = ["eval", "--model", str(tiny_model_dir), "--tasks", "SVAMP", "--nll-only"]
    argv += ["--limit", "1", "--no-progress", "--output", str(out)]
    assert cli.main(argv) == 2
    assert "did not write" in capsys.readouterr().err and snapshot(out) == user
    assert cli.main([*argv, "--overwrite"]) == 0
    assert cli.main([*argv, "--overwrite"]) == 0  # the user's train.jsonl survives both
    after = snapshot(out)
    assert {k: after[k] for k in user} == user and "SVAMP.nll.jsonl" in after


def _train_argv(model, data, out, *extra):
    return [
        "train", "--model", str(model), "--data", str(data), "--decontaminate", "none",
        "--num-blocks", "8", "--batch-size", "4", "--max-length", "256", "--logging-steps", "1",
        "--no-progress", "--seed", "1", "--output", str(out), *extra,
    ]  # fmt: skip


def test_train_refuses_a_foreign_adapter_folder(tmp_path, tiny_model_dir, math_file, capsys):
    out = tmp_path / "t"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "mine.safetensors").write_bytes(b"my weights")
    before = snapshot(out)
    assert cli.main(_train_argv(tiny_model_dir, math_file, out, "--max-steps", "1")) == 2
    assert "did not write (adapter)" in capsys.readouterr().err and snapshot(out) == before


def test_sigkill_before_first_checkpoint_then_rerun(tmp_path, tiny_model_dir, math_file, capsys):
    out = tmp_path / "t"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = _train_argv(tiny_model_dir, math_file, out, "--max-steps", "100000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qdiablo", *argv, "--save-steps", "100000"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while not (out / "log.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.5)
        assert (out / "log.jsonl").is_file(), "training never started"
        # A second writer is refused while the first lives.
        assert cli.main(_train_argv(tiny_model_dir, math_file, out, "--max-steps", "2")) == 2
        assert f"in use by process {proc.pid}" in capsys.readouterr().err
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not list((out / "checkpoints").glob("checkpoint-*/trainer_state.json"))
    # Killed before its first checkpoint, owner gone: a plain re-run starts afresh.
    assert cli.main(_train_argv(tiny_model_dir, math_file, out, "--max-steps", "2")) == 0
    printed = capsys.readouterr().out
    assert (
        "stopped before its first complete checkpoint" in printed and "starting afresh" in printed
    )
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 2 and results["resumed_from"] is None
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == 2
    assert not (out / LOCK_NAME).exists()


def test_resume_auto_skips_a_torn_checkpoint(tmp_path, tiny_model_dir, math_file, caplog):
    out = tmp_path / "t"
    argv = _train_argv(tiny_model_dir, math_file, out, "--max-steps", "2", "--save-steps", "1")
    assert cli.main(argv) == 0
    reference = load_file(out / "adapter" / "adapter_model.safetensors")
    state = out / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    state.write_text(state.read_text()[:40])  # torn mid-write
    marker = (out / marker_name("train")).read_text()
    assert json.loads(marker)["complete"] is True
    assert cli.main(argv) == 2  # a plain re-run does not clobber a run with a checkpoint
    assert (out / marker_name("train")).read_text() == marker  # and leaves it marked finished
    with caplog.at_level(logging.WARNING):
        assert cli.main([*argv, "--resume", "auto"]) == 0
    assert any(str(state) in r.getMessage() for r in caplog.records)
    results = json.loads((out / "train_results.json").read_text())
    assert results["resumed_from"].endswith("checkpoint-1")
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    # --overwrite starts afresh, removing only train's files.
    (out / "mine.txt").write_text("keep")
    assert cli.main(argv) == 2
    assert cli.main([*argv, "--overwrite"]) == 0
    assert (out / "mine.txt").read_text() == "keep"
    assert json.loads((out / "train_results.json").read_text())["resumed_from"] is None


def test_a_folder_from_before_markers_is_adopted_by_its_signature(tmp_path):
    """A training folder written before markers existed resumes; a stray file still counts."""
    from qdiablo.train.run import CONFIG_FILE, OUTPUT_NAMES

    out = tmp_path / "old"
    (out / "checkpoints").mkdir(parents=True)
    (out / CONFIG_FILE).write_text("{}")
    (out / "log.jsonl").write_text("")
    kwargs = dict(resumable=True, known=OUTPUT_NAMES, signature=CONFIG_FILE)
    with OutputFolder(out, "train", **kwargs) as folder:
        assert folder.files == {CONFIG_FILE, "log.jsonl", "checkpoints"}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "log.jsonl").write_text("mine")  # no signature: not adopted
    with pytest.raises(UserError, match=r"did not write \(log.jsonl\)"):
        OutputFolder(tmp_path / "other", "train", **kwargs).open()
