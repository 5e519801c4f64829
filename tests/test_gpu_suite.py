"""benchmarks/gpu_suite.py --smoke runs end to end on CPU (tiny shapes, torch path): the GPU
suite of issue 7 must not first crash on the lent GPU."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke_runs(tmp_path):
    out = tmp_path / "suite.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(out)]
    cmd += ["--only", "train", "decode", "diablo", "--methods", "diablo-packed-4bit"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU smoke path, even on a GPU box
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["smoke"] and "error" not in results["train"]["diablo-packed-4bit"]
    assert results["train"]["diablo-packed-4bit"]["shapes"]["2x64"]["tokens_per_s"] > 0
    assert {r["fastest"] for r in results["diablo"]["rows"]} <= {"bmm", "einsum"}
    assert "## GPU suite" in proc.stdout


def test_gpu_suite_refuses_without_cuda():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--only", "decode"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no CUDA device" in proc.stderr


@pytest.mark.slow  # waits out its 60 s budget: kept out of the quick loop
def test_gpu_suite_budget_stops_in_time_and_keeps_finished_sections(tmp_path):
    """--budget: sections run in priority order; the one running when the budget is spent is
    killed and recorded, later ones are skipped, and every finished section's JSON is kept."""
    out, budget = tmp_path / "suite.json", 60
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(out)]
    cmd += ["--budget", str(budget), "--only", "correctness", "kernels", "train", "diablo"]
    cmd += ["--methods", "diablo-packed-4bit", "lora-bf16", "--repeats", "30"]  # minutes on CPU
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    took = time.time() - t
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert took < budget + 30, f"took {took:.0f} s for a {budget} s budget"  # + start, report
    sections = {
        p.stem: json.loads(p.read_text()) for p in (tmp_path / "suite-sections").glob("*.json")
    }
    assert set(sections) == {"correctness", "kernels", "train", "diablo"}
    results = json.loads(out.read_text())
    assert sections["correctness"]["passed"] and sections["correctness"]["seconds"] > 0
    assert sections["kernels"]["rows"] and results["kernels"] == sections["kernels"]
    # 60 training runs take minutes on CPU, more than what is left: killed, then nothing runs
    assert "timeout" in sections["train"] and "budget" in sections["train"]["timeout"]
    assert "skipped" in sections["diablo"] and "budget" in sections["diablo"]["skipped"]
    assert "## GPU suite" in proc.stdout


@pytest.mark.slow  # a quantize, two trainings and an eval: half a minute
def test_gpu_suite_scale_section_runs_on_cpu(tmp_path):
    """The `scale` section (issue 19) end to end at tiny shapes: quantize, train at 1 × seq and
    at the planner's micro-batch, eval without the dequantized cache. On a GPU the same code
    puts each phase's measured peak beside the planner's."""
    out = tmp_path / "suite.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(out)]
    cmd += ["--only", "scale"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["scale"]["rows"]
    assert [r["phase"] for r in rows] == [
        "quantize",
        "train 1×seq",
        "train, planner's micro-batch",
        "eval (dequant cache off)",
    ]
    assert "| quantize |" in proc.stdout
