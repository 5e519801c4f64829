"""benchmarks/gpu_suite.py --smoke runs end to end on CPU (tiny shapes, torch path): the GPU
suite of issue 7 must not first crash on the lent GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
