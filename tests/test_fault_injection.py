"""Fault injection: every verb killed at points taken from its own progress, the disk filling up
at one of its writes, a read-only output, and the user's files in every folder; then run again.

Each verb runs as `python -m qdiablo` in a child process whose `sitecustomize`
(tests/faultkit/) records its progress events (file commits, torch/safetensors saves, log records),
sends it SIGKILL at the N-th, or from the N-th on makes every write to a file fail (RLIMIT_FSIZE
0: EFBIG, as a full disk). For every case:

- the user's files, planted in every folder the verb writes, survive byte for byte;
- an output that is not finished never looks finished: its marker says complete: false and the
  loaders refuse it, or it is complete and equal to the uninterrupted result;
- running the same command again (train: with --resume auto) converges to the uninterrupted
  result, bit for bit (every verb here is deterministic on one thread).

The quick case is quantize killed once; every verb's full set of cases is marked `slow`.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from qdiablo.errors import UserError
from qdiablo.ownership import marker_name

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "tests" / "faultkit"
MODEL_PARTS = ("base", "adapter", "merged", "merged-gptq", "marlin", "gguf")  # refused, not kept


# --------------------------------------------------------------------------------------------
# Running a verb in a child process
# --------------------------------------------------------------------------------------------


def _drop_dac_capabilities() -> None:
    """As root, permission bits do not apply (CAP_DAC_OVERRIDE): drop it from the bounding set,
    so that the exec'd child, though uid 0, meets a read-only folder as a user would."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def qdiablo(
    argv: list[str],
    cwd: Path,
    *,
    kill: int = 0,
    full: int = 0,
    events: Path | None = None,
    unprivileged: bool = False,
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(KIT), str(REPO)]),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "QDIABLO_FAULT_KILL": str(kill),
        "QDIABLO_FAULT_FULL": str(full),
        "QDIABLO_FAULT_EVENTS": str(events or ""),
    }
    env.pop("QDIABLO_DEBUG", None)

    def limits() -> None:
        if unprivileged and os.geteuid() == 0:
            _drop_dac_capabilities()

    return subprocess.run(
        [sys.executable, "-m", "qdiablo", *map(str, argv)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=limits,
        timeout=600,
    )


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The run failed with exit 2 and exactly one error line plus a hint, holding `words`."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(("qdiablo: error:", "hint:"))]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert [ln.split(":")[0] for ln in lines] == ["qdiablo", "hint"], proc.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines
    return lines[0]


# --------------------------------------------------------------------------------------------
# The user's files, and what a verb's output holds
# --------------------------------------------------------------------------------------------


def plant(out: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """A file of the user's in every folder under `out` but those under a `skip` prefix (and a
    folder of theirs at the top); returns them by path relative to `out`."""
    planted = {"my-folder/keep.txt": b"a folder of mine\n"}
    for folder in [out, *sorted(p for p in out.rglob("*") if p.is_dir())]:
        rel = folder.relative_to(out)
        skipped = any(rel.as_posix() == x or rel.as_posix().startswith(x + "/") for x in skip)
        if skipped or any(x.startswith(".") for x in rel.parts):
            continue
        planted[(rel / f"user-notes-{len(planted)}.txt").as_posix()] = f"mine {rel}\n".encode()
    for rel, data in planted.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    return planted


def assert_kept(out: Path, planted: dict[str, bytes]) -> None:
    for rel, data in planted.items():
        assert (out / rel).is_file(), f"the user's {rel} is gone"
        assert (out / rel).read_bytes() == data, f"the user's {rel} changed"


def marker(out: Path, verb: str) -> dict | None:
    path = out / marker_name(verb)
    return json.loads(path.read_text()) if path.is_file() else None


def finished(out: Path, verb: str) -> bool:
    return bool((marker(out, verb) or {}).get("complete"))


def jsonl_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["index"])


@dataclass
class Verb:
    """How one verb is run, what its result is, and how its unfinished output is refused."""

    name: str  # the verb whose marker the output folder carries
    argv: Callable[[Path], list[str]]
    result: Callable[[Path], dict]  # the deterministic part of a finished output
    refuse: Callable[..., None]  # loads an unfinished output (must raise UserError; run:
    # checks each stage's output itself)
    rerun: list[str] = field(default_factory=list)  # train: --resume auto
    skip: tuple[str, ...] = ()  # folders not planted into (export's parts: refused instead)


def _quantize_result(out: Path) -> dict:
    names = ("model.safetensors", "config.json", "quantize_config.json", "tokenizer.json")
    return {n: (out / n).read_bytes() for n in names}


def _refuse_model(out: Path) -> None:
    from qdiablo.models import load_tokenizer

    load_tokenizer(str(out))


def _adapter_config(folder: Path) -> dict:
    """An adapter's config but the base's path (the output root differs from run to run)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    config.pop("base_model_name_or_path")
    return config


def _train_result(out: Path) -> dict:
    results = json.loads((out / "train_results.json").read_text())
    return {
        "weights": (out / "adapter" / "adapter_model.safetensors").read_bytes(),
        "config": _adapter_config(out / "adapter"),
        "steps": results["global_step"],
    }


def _refuse_adapter(out: Path) -> None:
    from qdiablo.adapters.loading import adapter_kind

    adapter_kind(out / "adapter")


def _eval_result(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    rows = {p.name: jsonl_rows(p) for p in sorted(out.glob("*.jsonl"))}
    return {"tasks": summary["tasks"], "rows": rows}


def _refuse_eval(out: Path) -> None:
    from qdiablo.inputs import require_finished

    require_finished(out, ("eval",))


def _export_result(out: Path) -> dict:
    """Every file's sha256 but those holding times or paths (the card, the quantization
    report's seconds, the adapter's base path), which are compared without them."""
    files = json.loads((out / "manifest.json").read_text())["files"]
    varying = ("README.md", "adapter/adapter_config.json", "base/quantization_report.json",
               "base/quantization_report.md")  # fmt: skip
    result = {k: v["sha256"] for k, v in files.items() if k not in varying}
    return {**result, "adapter_config": _adapter_config(out / "adapter")}


def _refuse_export(out: Path) -> None:
    from qdiablo.models import load_exported

    load_exported(out)


STAGES = {  # a pipeline's stage folder: (its verb, its result, its loader)
    "quantized": ("quantize", _quantize_result, _refuse_model),
    "train": ("train", _train_result, _refuse_adapter),
    "eval": ("eval", _eval_result, _refuse_eval),
    "export": ("export", _export_result, _refuse_export),
}


def _run_result(out: Path) -> dict:
    return {folder: result(out / folder) for folder, (_, result, _) in STAGES.items()}


def _check_stages(out: Path, result: dict) -> None:
    """A pipeline stopped midway: each stage's output is finished and right, or refused."""
    for folder, (verb, stage_result, refuse) in STAGES.items():
        if finished(out / folder, verb):
            assert stage_result(out / folder) == result[folder], folder
        elif (out / folder / marker_name(verb)).exists():
            with pytest.raises(UserError, match="unfinished"):
                refuse(out / folder)


# --------------------------------------------------------------------------------------------
# The inputs: a tiny model, data, a quantized base and a trained adapter
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir, math_file) -> dict[str, Path]:
    from qdiablo import cli

    root = tmp_path_factory.mktemp("fault-inputs")
    tasks = root / "tasks.json"
    rows = [{"instruction": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(3)]
    tasks.write_text(json.dumps(rows))
    base, run = root / "base", root / "run"
    assert cli.main(["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--bits",
                     "4", "--group-size", "32", "--output", str(base)]) == 0  # fmt: skip
    assert cli.main([*TRAIN(base, math_file, run), "--base", "rtn", "--save-steps", "0"]) == 0
    return {"model": tiny_model_dir, "data": math_file, "tasks": tasks, "base": base, "run": run}


def TRAIN(model: Path, data: Path, out: Path) -> list[str]:
    return [
        "train", "--model", str(model), "--data", str(data), "--decontaminate", "none",
        "--num-blocks", "4", "--batch-size", "4", "--max-length", "256", "--max-steps", "3",
        "--save-steps", "1", "--save-total-limit", "2", "--logging-steps", "1", "--seed", "1",
        "--no-progress", "--output", str(out),
    ]  # fmt: skip


def verbs(inputs: dict[str, Path], tmp: Path) -> dict[str, Verb]:
    model, data, tasks = inputs["model"], inputs["data"], inputs["tasks"]
    quantize = ["quantize", "--model", model, "--method", "gptq", "--bits", "4", "--group-size",
                "32", "--calib", data, "--calib-samples", "4", "--calib-seq-len", "32",
                "--calib-dtype", "float32"]  # fmt: skip
    evaluate = ["eval", "--model", model, "--task-file", tasks, "--max-new-tokens", "6",
                "--batch-size", "1", "--no-progress"]  # fmt: skip
    config = tmp / "pipeline.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(model),
                "quantize": {"method": "rtn", "bits": 4, "group_size": 32},
                "train": {
                    "data": [str(data)],
                    "decontaminate": "none",
                    "num_blocks": 4,
                    "batch_size": 4,
                    "max_length": 256,
                    "max_steps": 2,
                    "save_steps": 1,
                    "progress": False,
                    "seed": 1,
                },
                "eval": {
                    "task_file": str(tasks),
                    "max_new_tokens": 4,
                    "batch_size": 1,
                    "no_progress": True,
                },
                "export": {"merged": True},
            }
        )
    )
    return {
        "quantize": Verb(
            "quantize", lambda o: [*quantize, "--output", o], _quantize_result, _refuse_model
        ),
        "quantize-recon": Verb(
            "quantize",
            lambda o: [*quantize, "--reconstruct", "--recon-steps", "2", "--output", o],
            _quantize_result,
            _refuse_model,
        ),
        "train": Verb(
            "train",
            lambda o: TRAIN(model, data, o),
            _train_result,
            _refuse_adapter,
            rerun=["--resume", "auto"],
        ),
        "eval": Verb("eval", lambda o: [*evaluate, "--output", o], _eval_result, _refuse_eval),
        "export": Verb(
            "export",
            lambda o: [
                "export",
                "--base",
                inputs["base"],
                "--train-run",
                inputs["run"],
                "--merged",
                "--output",
                o,
            ],
            _export_result,
            _refuse_export,
            skip=MODEL_PARTS,
        ),
        "run": Verb(
            "run",
            lambda o: ["run", config, "--output", o],
            _run_result,
            _check_stages,
            skip=tuple(f"export/{p}" for p in MODEL_PARTS),
        ),
    }


# --------------------------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------------------------


def reference(verb: Verb, tmp: Path) -> tuple[Path, dict, dict[str, bytes], list[str]]:
    """The uninterrupted run among the user's files, then the user's files planted in every
    folder it wrote, then an uninterrupted --overwrite run over it, whose progress events are
    recorded: (that folder, its result, the planted files, the events)."""
    out = tmp / "ref" / "out"
    out.mkdir(parents=True)
    (out / "user-first.txt").write_text("there before the verb ran\n")
    proc = qdiablo([*verb.argv(out), "--overwrite"], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = verb.result(out)
    planted = {"user-first.txt": b"there before the verb ran\n", **plant(out, verb.skip)}
    template = tmp / "template"
    shutil.copytree(out, template, symlinks=True)
    events = tmp / "events.txt"
    proc = qdiablo([*verb.argv(out), "--overwrite"], tmp, events=events)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert verb.result(out) == result  # deterministic: the same again, among the user's files
    assert_kept(out, planted)
    return template, result, planted, events.read_text().splitlines()


def check_after_fault(verb: Verb, out: Path, result: dict, planted: dict[str, bytes]) -> None:
    """The user's files are there; the output is finished and right, or refused."""
    assert_kept(out, planted)
    if finished(out, verb.name):
        assert verb.result(out) == result
    elif verb.name == "run":
        _check_stages(out, result)  # each stage output: finished and right, or refused
    else:
        with pytest.raises(UserError, match="unfinished"):
            verb.refuse(out)


def converge(verb: Verb, out: Path, result: dict, planted: dict[str, bytes], cwd: Path) -> None:
    """The same command again (no --overwrite: it finishes or resumes) gives the result."""
    proc = qdiablo([*verb.argv(out), *verb.rerun], cwd)
    if proc.returncode == 2 and "already holds a finished" in proc.stderr:
        assert finished(out, verb.name)  # done before the fault: nothing to redo
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert finished(out, verb.name)
    assert verb.result(out) == result
    assert_kept(out, planted)


WRITES = ("replace", "save_file", "torch.save")  # events that write a file


def spread(points: list[int], count: int) -> list[int]:
    """`count` of the event numbers `points`, spread over the run: the first, the last, and
    evenly between."""
    if count <= 1:
        return [points[len(points) // 2]][:count]
    picks = {points[round(i * (len(points) - 1) / (count - 1))] for i in range(count)}
    return sorted(picks)


def fault_cases(
    verb_name: str, kills: int, fulls: int, inputs, tmp_path, read_only: bool = True
) -> None:
    """The verb's reference run, then every case on its own copy of the reference folder (the
    cases are independent child processes: two run at a time, one per core of a 2-core CI)."""
    verb = verbs(inputs, tmp_path)[verb_name]
    template, result, planted, events = reference(verb, tmp_path)
    numbers = list(range(1, len(events) + 1))
    writes = [i for i, e in enumerate(events, 1) if e.split("\t", 1)[1].startswith(WRITES)]

    def killed(k: int) -> None:
        """SIGKILL at event k of the verb's own progress, then the same command again."""
        out = tmp_path / f"kill-{k}"
        shutil.copytree(template, out, symlinks=True)
        proc = qdiablo([*verb.argv(out), "--overwrite"], tmp_path, kill=k)
        assert proc.returncode == -9, f"not killed at event {k}: {events[k - 1]}\n{proc.stderr}"
        check_after_fault(verb, out, result, planted)
        converge(verb, out, result, planted, tmp_path)

    def disk_full(k: int) -> None:
        """The disk fills up at write event k (every write to a file fails from there): one
        line naming the file, nothing lost; then the same command again."""
        out = tmp_path / f"full-{k}"
        shutil.copytree(template, out, symlinks=True)
        proc = qdiablo([*verb.argv(out), "--overwrite"], tmp_path, full=k)
        one_line_error(proc, "file too large")
        check_after_fault(verb, out, result, planted)
        converge(verb, out, result, planted, tmp_path)

    def unwritable() -> None:
        """A read-only output: one line, and the folder exactly as it was."""
        out = tmp_path / "read-only"
        shutil.copytree(template, out, symlinks=True)
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        folders = [out, *(p for p in out.rglob("*") if p.is_dir())]
        for folder in folders:
            folder.chmod(0o555)
        try:
            proc = qdiablo([*verb.argv(out), "--overwrite"], tmp_path, unprivileged=True)
            one_line_error(proc, "permission denied", str(out))
        finally:
            for folder in folders:
                folder.chmod(0o755)
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    cases = [functools.partial(killed, k) for k in spread(numbers, kills)]
    # the last write is the marker's: nothing is written after it
    cases += [functools.partial(disk_full, k) for k in spread(writes[:-1], fulls)]
    cases += [unwritable] if read_only else []
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for done in [pool.submit(case) for case in cases]:
            done.result()  # re-raises a case's failure here


def test_quantize_killed_among_user_files(inputs, tmp_path):
    """The quick case: one kill midway (tests/test_nothing_lost.py has a quick full disk and a
    read-only folder)."""
    fault_cases("quantize", kills=1, fulls=0, inputs=inputs, tmp_path=tmp_path, read_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["quantize", "quantize-recon", "train", "eval", "export", "run"])
def test_every_verb_killed_disk_full_read_only_among_user_files(verb, inputs, tmp_path):
    fault_cases(verb, kills=3, fulls=2, inputs=inputs, tmp_path=tmp_path)
