"""Nothing lost, nothing silently wrong: one test per finding of the 45-probe audit (each failed
on fd25ea6). The user's files survive `run`/`compare` re-runs; no output may lie inside an input;
a diverged run is an error and non-finite weights are refused by name; unfinished folders are
refused naming the interrupted verb; operating-system faults are one line.

Where a case needs a fresh process (a file-size limit, a read-only folder), `python -m qdiablo`
runs as a child; everything else calls `qdiablo.cli.main` in this process.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CHAT_TEMPLATE, make_tiny_llama, make_tokenizer
from safetensors.torch import load_file

from qdiablo import DiaBloConfig, DiaBloModel, cli, get_diablo_model
from qdiablo.errors import UserError

REPO = Path(__file__).resolve().parents[1]
QUANTIZE = ["--method", "rtn", "--bits", "4", "--group-size", "32"]
EVAL = ["--tasks", "SVAMP", "--limit", "1", "--nll-only", "--no-progress"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_line(capsys, *words: str) -> str:
    """The call failed with one `qdiablo: error:` line (then the hint) holding `words`."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("qdiablo: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def marker(folder: Path, verb: str) -> dict:
    return json.loads((folder / f".qdiablo-{verb}.json").read_text())


def train_argv(model, data, out, *extra) -> list[str]:
    return [
        "train", "--model", str(model), "--data", str(data), "--decontaminate", "none",
        "--num-blocks", "4", "--batch-size", "4", "--max-length", "256", "--logging-steps", "1",
        "--no-progress", "--seed", "1", "--output", str(out), *map(str, extra),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_model_dir, math_file):
    """A quantized base, a DiaBlo adapter trained on it (a finished train run) and a finished
    evaluation, all written by the CLI."""
    root = tmp_path_factory.mktemp("made")
    base, run, ev = root / "base", root / "run", root / "eval"
    assert (
        cli.main(["quantize", "--model", str(tiny_model_dir), *QUANTIZE, "--output", str(base)])
        == 0
    )
    argv = train_argv(
        base, math_file, run, "--base", "rtn", "--max-steps", "1", "--save-steps", "0"
    )
    assert cli.main(argv) == 0
    assert cli.main(["eval", "--model", str(base), *EVAL, "--output", str(ev)]) == 0
    return {"base": base, "run": run, "adapter": run / "adapter", "eval": ev}


# --------------------------------------------------------------------------------------------
# 1. `qdiablo run` / `compare` keep the user's files
# --------------------------------------------------------------------------------------------


def test_run_keeps_user_files_on_force_and_after_a_config_change(
    tmp_path, tiny_model_dir, math_file, caplog
):
    out = tmp_path / "out"
    config = {
        "output": str(out),
        "model": str(tiny_model_dir),
        "quantize": {"method": "rtn", "bits": 4, "group_size": 32},
        "train": {"data": [str(math_file)], "decontaminate": "none", "num_blocks": 4,
                  "batch_size": 4, "max_length": 256, "max_steps": 2, "save_steps": 1,
                  "progress": False},
        "export": {},
    }  # fmt: skip
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["run", str(path)]) == 0
    mine = {
        "train/my_notes.txt": b"notes",
        "train/adapter/why.txt": b"why",
        "train/checkpoints/checkpoint-2/seen.txt": b"seen",
        "export/my_notes.txt": b"export notes",
        "quantized/notes.txt": b"q notes",
        "stages/notes.txt": b"stage notes",
    }
    for rel, data in mine.items():
        (out / rel).write_bytes(data)
    with caplog.at_level("WARNING"):
        assert cli.main(["run", str(path), "--force", "train"]) == 0
    assert {rel: (out / rel).read_bytes() for rel in mine} == mine
    assert any(
        "kept" in r.getMessage() and "my_notes.txt" in r.getMessage() for r in caplog.records
    )
    config["train"]["seed"] = 7  # a config change re-runs train and export too
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["run", str(path)]) == 0
    assert {rel: (out / rel).read_bytes() for rel in mine} == mine
    assert json.loads((out / "train" / "train_config.json").read_text())["seed"] == 7
    assert cli.main(["run", str(path), "--overwrite"]) == 0  # afresh: still the user's files
    assert {rel: (out / rel).read_bytes() for rel in mine} == mine


def test_compare_keeps_user_files_on_force(tmp_path, tiny_model_dir, math_file):
    out = tmp_path / "grid"
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"instruction": "What is 1 plus 1?", "answer": "2"}]))
    config = {
        "output": str(out),
        "model": str(tiny_model_dir),
        "bits": [4],
        "budgets": ["matched"],
        "quantize": {"calib": str(math_file), "calib_samples": 4, "calib_seq_len": 32,
                     "magr_iters": 2, "group_size": 32},
        "train": {"data": [str(math_file)], "decontaminate": "none", "num_blocks": 4,
                  "batch_size": 4, "max_length": 256, "max_steps": 1, "save_steps": 0,
                  "progress": False},
        "eval": {"task_file": str(tasks), "nll_only": True, "no_progress": True},
        "methods": [{"name": n, "skip": True} for n in ("QLoRA", "NF2-LoRA", "GPTQ-LoRA")],
    }  # fmt: skip
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["compare", str(path), "--in-process"]) == 0
    (train,) = (out / "train").iterdir()
    (ev,) = (out / "eval").iterdir()
    mine = {train / "notes.txt": b"t", train / "adapter" / "a.txt": b"a", ev / "e.txt": b"e"}
    for file, data in mine.items():
        file.write_bytes(data)
    assert cli.main(["compare", str(path), "--in-process", "--force", "train"]) == 0
    assert {f: f.read_bytes() for f in mine} == mine


# --------------------------------------------------------------------------------------------
# 2. No output inside an input; export copies only the base's own files
# --------------------------------------------------------------------------------------------


def test_an_export_into_its_own_base_is_refused_before_writing(made, tmp_path, capsys):
    before = snapshot(made["base"])
    argv = ["export", "--base", made["base"], "--adapter", made["adapter"]]
    assert cli.main([*map(str, argv), "--output", str(made["base"] / "exp")]) == 2
    one_line(capsys, "lies inside the input --base")
    assert snapshot(made["base"]) == before
    link = tmp_path / "link"  # a symlink to the base is the base
    link.symlink_to(made["base"])
    assert cli.main([*map(str, argv), "--output", str(link / "exp")]) == 2
    one_line(capsys, "lies inside the input --base")
    assert snapshot(made["base"]) == before


def test_export_copies_only_the_files_the_base_marker_lists(made, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for item in made["base"].iterdir():
        (base / item.name).write_bytes(item.read_bytes())
    (base / "notes.txt").write_text("mine")
    (base / "old-run").mkdir()  # a training run the user kept inside the base folder
    (base / "old-run" / "train_config.json").write_text("{}")
    (base / "old-run" / "big.safetensors").write_bytes(b"\0" * 1000)
    out = tmp_path / "exp"
    argv = ["export", "--base", str(base), "--adapter", str(made["adapter"]), "--output", str(out)]
    assert cli.main(argv) == 0
    listed = sorted(marker(base, "quantize")["files"])
    assert sorted(p.name for p in (out / "base").iterdir()) == listed
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert not [f for f in files if "notes" in f or "old-run" in f]


def test_every_verb_refuses_an_output_inside_an_input(
    made, tmp_path, tiny_model_dir, math_file, capsys
):
    model = tmp_path / "model"
    model.mkdir()
    for item in Path(tiny_model_dir).iterdir():
        (model / item.name).write_bytes(item.read_bytes())
    before = {p: snapshot(p) for p in (model, made["base"], made["run"], made["eval"])}
    cases = [
        (["quantize", "--model", model, *QUANTIZE, "--output", model / "q"], "lies inside"),
        (["quantize", "--model", model, *QUANTIZE, "--calib", math_file, "--output",
          math_file.parent], "contains the input --calib"),
        (train_argv(made["base"], math_file, made["base"] / "t", "--base", "rtn"), "lies inside"),
        (["eval", "--model", made["base"], *EVAL, "--output", made["base"]], "is the input"),
        (["eval", "--model", made["base"], "--adapter", made["adapter"], *EVAL, "--output",
          made["run"]], "contains the input --adapter"),
        (["export", "--base", made["base"], "--train-run", made["run"], "--eval", made["eval"],
          "--output", made["eval"] / "x"], "lies inside the input --eval"),
    ]  # fmt: skip
    for argv, words in cases:
        assert cli.main([str(a) for a in argv]) == 2, argv
        one_line(capsys, words)
    config = tmp_path / "p.yaml"  # a pipeline whose root holds its model
    root = {"output": str(tmp_path), "model": str(model)}
    config.write_text(yaml.safe_dump({**root, "quantize": {"method": "rtn", "group_size": 32}}))
    assert cli.main(["run", str(config)]) == 2
    one_line(capsys, "contains the input quantize model")
    assert {p: snapshot(p) for p in before} == before


# --------------------------------------------------------------------------------------------
# 3. Numerical health
# --------------------------------------------------------------------------------------------


def test_a_diverged_run_is_an_error_that_keeps_the_last_good_checkpoint(
    tmp_path, tiny_model_dir, math_file, capsys
):
    out = tmp_path / "t"
    argv = train_argv(tiny_model_dir, math_file, out, "--max-steps", "6", "--save-steps", "1")
    assert cli.main([*argv, "--lr", "1e30", "--max-grad-norm", "0"]) == 2
    line = one_line(capsys, "training diverged", "not finite")
    assert "adapter values (first: " in line
    assert not (out / "adapter").exists() and not (out / "train_results.json").exists()
    assert marker(out, "train")["complete"] is False
    kept = sorted((out / "checkpoints").glob("checkpoint-*/trainer_state.json"))
    assert kept, "the good checkpoints before the divergence are kept"
    for state in kept:
        tensors = load_file(state.parent / "adapter_model.safetensors")
        assert all(torch.isfinite(t).all() for t in tensors.values()), state.parent
    # Nothing downstream takes it for a finished run.
    assert cli.main(["export", "--base", str(tiny_model_dir), "--train-run", str(out),
                     "--output", str(tmp_path / "e")]) == 2  # fmt: skip
    capsys.readouterr()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny model fitted to answer every question with "The answer is 7." (a low loss to
    start from), and those records."""
    root = tmp_path_factory.mktemp("fitted")
    from qdiablo.data import build_prompt

    rows = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": "The answer is 7.",
             "answer": "7"} for i in range(8)]  # fmt: skip
    (root / "const.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok, model = make_tokenizer(), make_tiny_llama(seed=0)
    pairs = []
    for r in rows:
        prompt = tok(build_prompt(r["instruction"]))["input_ids"]
        answer = tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        pairs.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.tensor([a + [2] * (width - len(a)) for a, _ in pairs])
    labels = torch.tensor([b + [-100] * (width - len(b)) for _, b in pairs])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model", root / "const.jsonl"


def test_a_loss_rising_far_above_its_start_is_a_warning(fitted, tmp_path, capsys):
    model, data = fitted
    out = tmp_path / "t"
    argv = train_argv(model, data, out, "--max-steps", "4", "--lr", "1e10", "--warmup", "0")
    assert cli.main(argv) == 0  # clipping on: it stays finite, but goes the wrong way
    results = json.loads((out / "train_results.json").read_text())
    first, last = results["first_logged_loss"], results["last_logged_loss"]
    assert last > max(2 * first, first + 1)
    assert len(results["warnings"]) == 1 and "the loss rose" in results["warnings"][0]
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["warning"] for r in logged if "warning" in r] == results["warnings"]
    assert "warning: the loss rose" in capsys.readouterr().out
    calm = tmp_path / "calm"  # the same data at a sane rate: no warning
    assert cli.main(train_argv(model, data, calm, "--max-steps", "4", "--warmup", "0")) == 0
    assert json.loads((calm / "train_results.json").read_text())["warnings"] == []


def _nan_adapter(base: Path, folder: Path) -> str:
    from qdiablo.models import load_base

    model = get_diablo_model(load_base(str(base)), DiaBloConfig(num_blocks=4))
    name, layer = list(model.diablo_layers())[3]
    with torch.no_grad():
        layer.blocks[0, 0, 0] = float("nan")
    model.save_pretrained(folder)
    return f"{name}.blocks"


def test_eval_merge_and_export_refuse_a_nan_adapter_naming_the_tensor(made, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    tensor = _nan_adapter(made["base"], adapter)
    out = tmp_path / "ev"
    assert cli.main(["eval", "--model", str(made["base"]), "--adapter", str(adapter), *EVAL,
                     "--output", str(out)]) == 2  # fmt: skip
    one_line(capsys, tensor, "non-finite")
    assert cli.main(["eval", "--model", str(made["base"]), "--adapter", str(adapter), *EVAL,
                     "--merge-adapter", "--output", str(out)]) == 2  # fmt: skip
    one_line(capsys, tensor)
    assert cli.main(["export", "--base", str(made["base"]), "--adapter", str(adapter),
                     "--merged", "--output", str(tmp_path / "exp")]) == 2  # fmt: skip
    one_line(capsys, tensor)
    assert not (tmp_path / "exp").exists()


def test_a_nonfinite_nll_is_null_with_a_flag_and_the_run_goes_on(tmp_path, capsys):
    model = make_tiny_llama(seed=0)
    with torch.no_grad():  # finite weights whose float16 logits overflow
        model.model.norm.weight.mul_(400)
        model.lm_head.weight.mul_(400)
    model.save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    out = tmp_path / "ev"
    argv = ["eval", "--model", str(tmp_path / "m"), "--dtype", "float16", *EVAL,
            "--output", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in (out / "SVAMP.nll.jsonl").read_text().splitlines()]
    assert rows and all(r["nll_sum"] is None and r["nonfinite"] is True for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"]["SVAMP"]["nll"] is None
    assert summary["tasks"]["SVAMP"]["nll_nonfinite"] == len(rows)
    assert cli.main([*argv[:-2], "--limit", "2", "--output", str(out)]) == 0  # resumes, reads
    assert json.loads((out / "summary.json").read_text())["tasks"]["SVAMP"]["nll_nonfinite"] == 2
    capsys.readouterr()


# --------------------------------------------------------------------------------------------
# 4. Unfinished means unfinished; one rule for replacing a finished output
# --------------------------------------------------------------------------------------------


def _unfinish(folder: Path, verb: str) -> None:
    path = folder / f".qdiablo-{verb}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "complete": False}))


def test_unfinished_folders_are_refused_naming_the_interrupted_verb(made, tmp_path, capsys):
    killed = tmp_path / "killed"  # a quantize killed before it wrote anything but its marker
    killed.mkdir()
    (killed / ".qdiablo-quantize.json").write_text(
        json.dumps({"verb": "quantize", "format_version": 1, "complete": False, "files": []})
    )
    out = str(tmp_path / "ev")
    assert cli.main(["eval", "--model", str(killed), *EVAL, "--output", out]) == 2
    one_line(capsys, "unfinished", "`qdiablo quantize` was interrupted")
    copies = {}
    for name in ("base", "run", "eval"):
        copies[name] = tmp_path / name
        copies[name].mkdir()
        for item in made[name].rglob("*"):
            target = copies[name] / item.relative_to(made[name])
            target.mkdir(exist_ok=True) if item.is_dir() else target.write_bytes(item.read_bytes())
    export = tmp_path / "export"
    assert cli.main(["export", "--base", str(copies["base"]), "--train-run", str(copies["run"]),
                     "--eval", str(copies["eval"]), "--output", str(export)]) == 0  # fmt: skip
    cases = [  # (folder, verb, a command that loads it)
        (copies["base"], "quantize", ["eval", "--model", copies["base"], *EVAL, "--output", out]),
        (copies["run"], "train", ["eval", "--model", copies["base"], "--adapter",
                                  copies["run"] / "adapter", *EVAL, "--output", out]),
        (export, "export", ["eval", "--model", export, *EVAL, "--output", out]),
        (copies["eval"], "eval", ["export", "--base", copies["base"], "--train-run",
                                  copies["run"], "--eval", copies["eval"], "--output",
                                  tmp_path / "e2"]),
    ]  # fmt: skip
    for folder, verb, argv in cases:
        _unfinish(folder, verb)
        assert cli.main([str(a) for a in argv]) == 2, verb
        one_line(capsys, "unfinished", f"`qdiablo {verb}` was interrupted")
        path = folder / f".qdiablo-{verb}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "complete": True}))


def test_quantize_replaces_its_finished_output_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", "--model", str(tmp_path / "m"), *QUANTIZE, "--output", str(out)]
    make_tiny_llama(seed=0).save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    assert cli.main(argv) == 0
    before = snapshot(out)
    assert cli.main(argv) == 2
    one_line(capsys, "already holds a finished `qdiablo quantize` output")
    assert snapshot(out) == before
    assert cli.main([*argv, "--overwrite"]) == 0


# --------------------------------------------------------------------------------------------
# 5. Faults are one line
# --------------------------------------------------------------------------------------------


def _child(argv, cwd: Path, fsize: int | None = None, unprivileged: bool = False):
    def limits() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))
        if unprivileged and os.geteuid() == 0:  # root ignores permission bits: drop that
            libc = ctypes.CDLL(None, use_errno=True)
            for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
                if libc.prctl(24, cap, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("QDIABLO_DEBUG", None)
    command = [sys.executable, "-m", "qdiablo", *map(str, argv)]
    proc = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, preexec_fn=limits, timeout=600
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("qdiablo: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_reconstruction_with_too_few_windows_is_refused_before_loading(tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", "--model", str(tmp_path / "no-such-model"), "--method", "gptq",
            "--reconstruct", "--calib-samples", "1", "--output", str(out)]  # fmt: skip
    assert cli.main(argv) == 2  # before loading: the missing model is never reached
    one_line(capsys, "--reconstruct needs at least 2 calibration windows")
    assert not out.exists()
    assert cli.main(["demo", "--calib-samples", "1", "--output", str(out)]) == 2  # demo too
    one_line(capsys, "reconstruction needs at least 2 calibration windows")
    assert not out.exists()


def test_a_read_only_output_and_a_full_disk_during_a_checkpoint_are_one_line(
    tmp_path, tiny_model_dir, math_file
):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        line = _child(["quantize", "--model", tiny_model_dir, *QUANTIZE, "--output",
                       locked / "q"], tmp_path, unprivileged=True)  # fmt: skip
        assert "permission denied" in line and str(locked) in line
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []
    out = tmp_path / "t"  # the adapter (48 KiB) fits under the limit, optimizer.pt does not
    argv = train_argv(tiny_model_dir, math_file, out, "--max-steps", "2", "--save-steps", "1")
    line = _child(argv, tmp_path, fsize=80_000)
    assert "file too large" in line and str(out / "checkpoints" / "checkpoint-1") in line
    assert json.loads((out / ".qdiablo-train.json").read_text())["complete"] is False


@pytest.mark.skipif(
    not (Path("/dev/full").exists() and stat.S_ISCHR(os.stat("/dev/full").st_mode)),
    reason="needs Linux's /dev/full device",
)
def test_no_space_left_is_one_line_also_inside_torch_save():
    """/dev/full fails every write with ENOSPC: a real full disk, for open() and torch.save
    (which says only "unexpected pos"). Both write in place (never a temporary renamed onto
    the device)."""
    from qdiablo.faults import guard

    full = "/dev/full: no space left on the device"
    with pytest.raises(UserError, match=full) as e, guard("/dev/full"), open("/dev/full", "w") as f:
        f.write("x" * 100_000)
    assert "free some space" in e.value.hint
    with pytest.raises(UserError, match=full), guard("/dev/full"):
        torch.save({"t": torch.zeros(100_000)}, "/dev/full")


def test_a_path_too_long_is_one_line(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / ("x" * 300) / "q"
    assert (
        cli.main(["quantize", "--model", str(tiny_model_dir), *QUANTIZE, "--output", str(out)]) == 2
    )
    one_line(capsys, "path too long")


def test_a_chat_template_the_sandbox_blocks_is_one_line_and_keeps_the_marker(
    tmp_path, tiny_model_dir, capsys
):
    model = tmp_path / "m"
    model.mkdir()
    for item in Path(tiny_model_dir).iterdir():
        (model / item.name).write_bytes(item.read_bytes())
    (model / "chat_template.jinja").write_text("{{ ''.__class__.__mro__ }}" + CHAT_TEMPLATE)
    out = tmp_path / "ev"
    argv = ["eval", "--model", str(model), "--template", "chat", "--tasks", "SVAMP", "--limit",
            "1", "--no-progress", "--output", str(out)]  # fmt: skip
    assert cli.main(argv) == 2
    one_line(capsys, "chat template", "SecurityError")
    assert marker(out, "eval")["complete"] is False


# --------------------------------------------------------------------------------------------
# 7. Smaller findings
# --------------------------------------------------------------------------------------------


def test_a_changed_target_modules_is_not_called_a_different_base(tmp_path):
    base = make_tiny_llama(seed=0)
    model = get_diablo_model(base, DiaBloConfig(num_blocks=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj"]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as e:
        DiaBloModel.from_pretrained(make_tiny_llama(seed=0), tmp_path / "a")
    assert "target_modules" in str(e.value) and "different base" not in str(e.value)
    assert "v_proj" in str(e.value)  # the layers trained but not selected now are named
    # A base that really differs (same shapes, other weights) is still called one.
    get_diablo_model(make_tiny_llama(seed=0), DiaBloConfig(num_blocks=4)).save_pretrained(
        tmp_path / "b"
    )
    with pytest.raises(UserError, match="different base: the base's weights differ in 10"):
        DiaBloModel.from_pretrained(make_tiny_llama(seed=1), tmp_path / "b")


def test_eval_threads_zero_is_refused_before_loading(tmp_path, capsys):
    argv = ["eval", "--model", str(tmp_path / "nowhere"), "--threads", "0", *EVAL,
            "--output", str(tmp_path / "ev")]  # fmt: skip
    assert cli.main(argv) == 2
    one_line(capsys, "--threads 0")
    assert not (tmp_path / "ev").exists()
