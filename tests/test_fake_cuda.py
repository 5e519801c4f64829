"""qdiablo's CUDA code paths checked on a CPU-only torch (issue 19): one quantize block, a packed
DiaBlo training step (with and without gradient checkpointing) and greedy generation run on
"cuda" through fake tensors, failing on any tensor left on the CPU; the training step asks the
device for nothing (no device→host read, no host→device copy from quantizers/ or
qdiablo/diablo/). See tests/fakecuda/check_cuda_paths.py for how, and its limits.

The shim (tests/fakecuda/fakecuda.cpp: a no-op CUDA device guard and CUDA hooks, so autograd runs
backward on fake CUDA tensors) is compiled against the installed torch; without a C++ compiler,
or if it does not build, the test skips and says why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

pytestmark = pytest.mark.slow  # a C++ build and a child process: about a minute and a half


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the fake-CUDA shim")
    import torch
    import torch.utils.cpp_extension as ce

    out = tmp_path_factory.mktemp("fakecuda") / "fakecuda.so"
    lib = Path(torch.__file__).parent / "lib"
    command = [
        compiler,
        "-std=c++20",
        "-O1",
        "-shared",
        "-fPIC",
        *(f"-I{p}" for p in ce.include_paths()),
        str(HERE / "fakecuda" / "fakecuda.cpp"),
        f"-L{lib}",
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{lib}",
        "-o",
        str(out),
    ]
    built = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if built.returncode != 0:
        pytest.skip(f"the fake-CUDA shim does not build here: {built.stderr[-500:]}")
    return out


def test_cuda_paths_place_everything_on_the_device(shim):
    env = {
        **os.environ,
        "LD_PRELOAD": str(shim),
        "QDIABLO_FAKECUDA_SO": str(shim),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    script = HERE / "fakecuda" / "check_cuda_paths.py"
    child = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900
    )
    lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, child.stderr[-3000:]
    results = json.loads(lines[-1].removeprefix("RESULT "))
    failed = {name: r for name, r in results.items() if not r["ok"]}
    assert not failed, json.dumps(failed, indent=1)
    assert set(results) == {
        "quantize",
        "train",
        "train-checkpointing",
        "generate",
        "generate-dequant-cache",
    }
    assert results["quantize"]["packed_layers"] == 7
    for step in ("train", "train-checkpointing"):
        assert results[step]["reads"] == [] and results[step]["copies"] == [], results[step]
