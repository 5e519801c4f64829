"""The quantizer defaults table (issue 11): one factor at a time from the defaults, on SmolLM2.

Cells: W2/W3/W4 x g64/g128. In every cell, GPTQ and MagR+GPTQ with the defaults of 2026-12-01
("old": bf16 XᵀX products, group-size β rule, FISTA-50), then each factor changed alone:
  - fp32prod: each calibration batch's XᵀX in float32 instead of rounded to bfloat16;
  - beta: MagR's scale shrink per the official code's bit-width rule (0.8 / 0.9 / 1.0 at
    2 / 3 / 4 bits, whatever the group size) instead of the group-size rule;
  - plain200: MagR solved by the paper's 200 plain proximal-gradient steps instead of FISTA-50;
and `chosen`: GPTQ and MagR+GPTQ with today's code defaults (no override), the combination the
table chose.
Each run is one `benchmarks/quantizers_smollm2.py` process (its perplexity and calibration:
32 windows of SVAMP questions; perplexity on GSM8K question+solution text), its JSON kept in
--out-dir so that a second call resumes; then the table is printed for BENCHMARKS.md.

    OMP_NUM_THREADS=1 python benchmarks/quantizer_defaults.py --jobs 2 --out-dir runs/defaults
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
OFFICIAL_BETA = {2: 0.8, 3: 0.9, 4: 1.0}  # the MagR code's rule: by bit width only
FACTORS = ("old", "products", "beta", "plain200", "chosen")


def old_beta(bits: int, group_size: int) -> float:
    """The β rule before this table: by group size (0.95 at g128 and above, 1.0 below)."""
    return 0.95 if group_size >= 128 else 1.0


def jobs(bits: list[int], groups: list[int], factors: list[str]) -> dict[str, list[str]]:
    """name -> quantizers_smollm2.py arguments."""
    out = {}
    for g in groups:
        for b in bits:
            cell = ["--bits", str(b), "--group-size", str(g)]
            old = [*cell, "--products", "calib"]
            if "old" in factors:
                out[f"w{b}g{g}-default"] = [*old, "--methods", "GPTQ", "MagR+GPTQ"]
            if "products" in factors:
                out[f"w{b}g{g}-fp32prod"] = [
                    *cell, "--methods", "GPTQ", "MagR+GPTQ", "--products", "float32"
                ]  # fmt: skip
            if "beta" in factors and OFFICIAL_BETA[b] != old_beta(b, g):
                out[f"w{b}g{g}-beta"] = [
                    *old, "--methods", "MagR+GPTQ", "--set", f"beta={OFFICIAL_BETA[b]}"
                ]  # fmt: skip
            if "plain200" in factors:
                out[f"w{b}g{g}-plain200"] = [
                    *old, "--methods", "MagR+GPTQ", "--set", "magr_solver=plain", "magr_iters=200"
                ]  # fmt: skip
            if "chosen" in factors:
                out[f"w{b}g{g}-chosen"] = [*cell, "--methods", "GPTQ", "MagR+GPTQ"]
    return out


def run_one(name: str, args: list[str], out_dir: Path, threads: int) -> None:
    out = out_dir / f"{name}.json"
    if out.exists():
        return
    cmd = [sys.executable, str(HERE / "quantizers_smollm2.py"), "--calib-samples", "32"]
    cmd += ["--threads", str(threads), *args, "--out", str(out_dir / f"{name}.partial.json")]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(out_dir / f"{name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    (out_dir / f"{name}.partial.json").replace(out)
    print(f"{name}: done", flush=True)


def rows(out_dir: Path) -> dict[str, dict[str, dict]]:
    """name -> method -> row, for every finished run."""
    found = {}
    for path in sorted(out_dir.glob("*.json")):
        if path.name.endswith(".partial.json"):
            continue
        data = json.loads(path.read_text())
        found[path.stem] = {r["method"]: r for r in data["rows"] if r["bits"] < 32}
    return found


def table(out_dir: Path) -> str:
    """One line per cell and variant: GPTQ and MagR+GPTQ perplexity, time, Cholesky retries."""
    found = rows(out_dir)
    lines = [
        "| cell | variant | GPTQ ppl | MagR+GPTQ ppl | MagR+GPTQ quantize s | Cholesky retries |",
        "|---|---|---:|---:|---:|---:|",
    ]

    def cell_key(name: str) -> tuple[int, int, str]:
        cell, _, variant = name.partition("-")
        variant = {"default": "old", "fp32prod": "products"}.get(variant, variant)
        b, g = cell[1:].split("g")
        order = list(FACTORS)
        return (int(g), -int(b), str(order.index(variant) if variant in order else variant))

    for name in sorted(found, key=cell_key):
        cell, _, variant = name.partition("-")
        variant = {"default": "old defaults", "fp32prod": "float32 XᵀX"}.get(variant, variant)
        methods = found[name]
        gptq, magr = methods.get("GPTQ"), methods.get("MagR+GPTQ")
        retries = [
            f"{len(r['cholesky_fallbacks'])}/{r['layers']}" for r in (gptq, magr) if r is not None
        ]
        lines.append(
            f"| {cell.upper()} | {variant} | "
            + (f"{gptq['ppl']:,.2f}" if gptq else "")
            + " | "
            + (f"{magr['ppl']:,.2f} | {magr['quant_s']:.0f}" if magr else " | ")
            + f" | {' · '.join(retries)} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--group-sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument(
        "--factors", nargs="+", default=list(FACTORS), choices=FACTORS,
    )  # fmt: skip
    p.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out-dir", type=Path, default=Path("runs/quantizer-defaults"))
    p.add_argument("--table-only", action="store_true", help="print the table of finished runs")
    args = p.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        todo = jobs(args.bits, args.group_sizes, args.factors)
        with ThreadPoolExecutor(args.jobs) as pool:
            for f in [
                pool.submit(run_one, n, a, args.out_dir, args.threads) for n, a in todo.items()
            ]:
                f.result()
    print(table(args.out_dir))


if __name__ == "__main__":
    main()
