"""A killed `qdiablo quantize --reconstruct` on SmolLM2-135M resumes to the same folder.

    python benchmarks/resume_smollm2.py --work /work/runs/resume-smollm2 [--kill-after 9]

Three runs of the same command (W2 g64, MagR + GPTQ + block-wise reconstruction, the demo's
quantizer with 16 windows and 20 reconstruction steps): one uninterrupted; one SIGKILLed as soon
as its log says block K was saved; the same command again, which resumes. It checks that the
resumed run quantized only the blocks after the last one saved and that its folder equals the
uninterrupted one, every file byte for byte except the wall-clock fields of the quantization
report; the result goes to
benchmarks/results/resume-smollm2.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--model", "smollm2", "--bits", "2", "--group-size", "64", "--magr", "--reconstruct"]
# Fewer windows and steps than the demo's (32, 60): the same code paths at a third of the time.
FLAGS += ["--calib-samples", "16", "--recon-steps", "20", "--device", "cpu", "--overwrite"]


def masked(path: Path) -> bytes:
    """A file's bytes, with the report's wall-clock fields blanked."""
    data = path.read_bytes()
    if path.name == "quantization_report.json":

        def strip(o):
            if isinstance(o, dict):
                return {k: strip(v) for k, v in o.items() if "seconds" not in k}
            return [strip(v) for v in o] if isinstance(o, list) else o

        return json.dumps(strip(json.loads(data)), sort_keys=True).encode()
    if path.name == "quantization_report.md":
        return re.sub(rb"\d+ s\)", b"T s)", data)
    return data


def compare(a: Path, b: Path) -> dict:
    names = sorted(p.name for p in a.iterdir() if not p.name.startswith("."))
    other = sorted(p.name for p in b.iterdir() if not p.name.startswith("."))
    raw = [n for n in names if (a / n).read_bytes() == (b / n).read_bytes()]
    same = [n for n in names if n in other and masked(a / n) == masked(b / n)]
    return {
        "files": names,
        "byte_identical": raw,
        "identical_masked": same,
        "equal": same == names == other,
    }


def run(argv: list[str], log: Path, kill_after: int | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    start = time.time()
    blocks = []
    with open(log, "w") as f:
        child = subprocess.Popen(
            [sys.executable, "-m", "qdiablo", "quantize", *argv],
            stderr=subprocess.PIPE,
            stdout=f,
            env=env,
            text=True,
        )
        for line in child.stderr:
            f.write(line)
            f.flush()
            saved = re.search(r"block (\d+) saved", line)
            if saved:
                blocks.append(int(saved.group(1)))
                if kill_after is not None and blocks[-1] >= kill_after:
                    child.send_signal(signal.SIGKILL)
                    break
        child.wait()
    return {
        "returncode": child.returncode,
        "seconds": round(time.time() - start, 1),
        "saved": blocks,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--kill-after", type=int, default=9)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    whole, resumed = args.work / "uninterrupted", args.work / "resumed"
    result = {"command": "qdiablo quantize " + " ".join(FLAGS) + " --output OUT"}
    result["uninterrupted"] = run([*FLAGS, "--output", str(whole)], args.work / "whole.log")
    result["killed"] = run(
        [*FLAGS, "--output", str(resumed)], args.work / "killed.log", args.kill_after
    )
    partial = sorted(p.name for p in (resumed / ".quantize-partial").glob("block-*"))
    result["blocks_on_disk_after_kill"] = len(partial)
    result["resumed"] = run([*FLAGS, "--output", str(resumed)], args.work / "resumed.log")
    log = (args.work / "resumed.log").read_text()
    result["resume_line"] = next((l for l in log.splitlines() if "resuming:" in l), None)
    result["comparison"] = compare(whole, resumed)
    result["date"] = time.strftime("%Y-%m-%d")
    out = REPO / "benchmarks" / "results"
    (out / "resume-smollm2.json").write_text(json.dumps(result, indent=2) + "\n")
    c = result["comparison"]
    differ = ", ".join(sorted(set(c["files"]) - set(c["byte_identical"]))) or "none"
    md = [
        "# A killed SmolLM2 quantize with --reconstruct resumes to the same folder",
        "",
        f"Command: `{result['command']}` (one thread; {result['date']}).",
        "",
        "| run | exit | seconds | blocks saved |",
        "|---|---|---|---|",
    ]
    for name in ("uninterrupted", "killed", "resumed"):
        r = result[name]
        md.append(f"| {name} | {r['returncode']} | {r['seconds']} | {len(r['saved'])} |")
    md += [
        "",
        f"Blocks on disk after the kill: {result['blocks_on_disk_after_kill']}; the resumed run "
        f"logged: `{(result['resume_line'] or '').split(': ', 1)[-1]}`.",
        f"Files byte-identical to the uninterrupted run: {len(c['byte_identical'])} of "
        f"{len(c['files'])} (not: {differ}, whose wall-clock fields differ); identical with "
        f"those masked: {'yes' if c['equal'] else '**no**'}.",
    ]
    (out / "resume-smollm2.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    sys.exit(0 if c["equal"] else 1)


if __name__ == "__main__":
    main()
