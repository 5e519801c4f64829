"""The quantizer defaults table (issue 11): one factor at a time from the defaults, on SmolLM2.

Cells: W2/W3/W4 x g64/g128. In every cell, GPTQ and MagR+GPTQ with the defaults of 2026-12-01
("old": bf16 XᵀX products, group-size β rule, FISTA-50), then each factor changed alone:
  - fp32prod: each calibration batch's XᵀX in float32 instead of rounded to bfloat16;
  - beta: MagR's scale shrink per the official code's bit-width rule (0.8 / 0.9 / 1.0 at
    2 / 3 / 4 bits, whatever the group size) instead of the group-size rule;
  - plain200: MagR solved by the paper's 200 plain proximal-gradient steps instead of FISTA-50;
then `chosen`: GPTQ and MagR+GPTQ with today's code defaults (no override), the combination the
table chose, `recon`: MagR+GPTQ with block-wise reconstruction at those defaults, and
`recon100`: the same with 100 steps and patience 5.
Each run is one `benchmarks/quantizers_smollm2.py` process (its perplexity and calibration:
32 windows of SVAMP questions; perplexity on GSM8K question+solution text), its JSON kept in
--out-dir so that a second call resumes; then the table is printed for BENCHMARKS.md.

    OMP_NUM_THREADS=1 python benchmarks/quantizer_defaults.py --jobs 2   # runs/quantizer-defaults
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
FACTORS = ("old", "products", "beta", "plain200", "chosen", "recon")
VARIANT_FACTOR = {
    "default": "old",
    "fp32prod": "products",
    "beta": "beta",
    "plain200": "plain200",
    "chosen": "chosen",
    "recon": "recon",
    "recon100": "recon",
}


def old_beta(bits: int, group_size: int) -> float:
    """The β rule before this table: by group size (0.95 at g128 and above, 1.0 below)."""
    return 0.95 if group_size >= 128 else 1.0


def jobs(bits: list[int], groups: list[int], factors: list[str]) -> dict[str, list[str]]:
    """name -> quantizers_smollm2.py arguments, in the order to run them (each cell's plain200
    last: it is the slowest)."""
    out = {}
    for g in groups:
        for b in bits:
            cell = ["--bits", str(b), "--group-size", str(g)]
            beta = f"beta={old_beta(b, g)}"  # MagR+GPTQ only: plain GPTQ keeps β = 1
            both = ["--methods", "GPTQ", "MagR+GPTQ"]
            variants = {
                "default": [*cell, *both, "--products", "calib", "--set-magr", beta],
                "fp32prod": [*cell, *both, "--products", "float32", "--set-magr", beta],
                "beta": [
                    *cell, "--methods", "MagR+GPTQ", "--products", "calib",
                    "--set", f"beta={OFFICIAL_BETA[b]}",
                ],
                "chosen": [*cell, *both],  # today's code defaults, no override
                "recon": [*cell, "--methods", "MagR+GPTQ+recon"],
                "recon100": [
                    *cell, "--methods", "MagR+GPTQ+recon",
                    "--set", "recon_steps=100", "recon_patience=5",
                ],
                "plain200": [
                    *cell, "--methods", "MagR+GPTQ", "--products", "calib",
                    "--set-magr", beta, "magr_solver=plain", "magr_iters=200",
                ],
            }  # fmt: skip
            if OFFICIAL_BETA[b] == old_beta(b, g):  # same β: beta is old, chosen is fp32prod
                del variants["beta"], variants["chosen"]
            for variant, args in variants.items():
                if VARIANT_FACTOR[variant] in factors:
                    out[f"w{b}g{g}-{variant}"] = args
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


LABELS = {
    "default": "old defaults (bf16 XᵀX, group-size β, FISTA-50)",
    "fp32prod": "float32 XᵀX",
    "beta": "β by bits (official)",
    "plain200": "MagR plain-200",
    "chosen": "**chosen** (float32 XᵀX, β by bits, FISTA-50)",
    "recon": "**chosen + reconstruction** (60 steps, stop at the first held-out rise)",
    "recon100": "chosen + reconstruction, 100 steps, patience 5",
}


def table(out_dir: Path) -> str:
    """One line per cell and variant: GPTQ and MagR+GPTQ perplexity, the MagR+GPTQ quantize
    time and the Cholesky retries (GPTQ · MagR+GPTQ)."""
    found = rows(out_dir)
    lines = [
        "| cell | variant | GPTQ ppl | MagR+GPTQ ppl | MagR+GPTQ s | Cholesky retries |",
        "|---|---|---:|---:|---:|---:|",
    ]
    order = list(LABELS)

    def key(name: str) -> tuple[int, int, int]:
        cell, _, variant = name.partition("-")
        b, g = cell[1:].split("g")
        return int(g), int(b), order.index(variant) if variant in order else len(order)

    for name in sorted(found, key=key):
        cell, _, variant = name.partition("-")
        methods = found[name]
        gptq = methods.get("GPTQ")
        magr = methods.get("MagR+GPTQ") or methods.get("MagR+GPTQ+recon")
        retries = [
            f"{len(r['cholesky_fallbacks'])}/{r['layers']}" for r in (gptq, magr) if r is not None
        ]
        seconds = ""
        if magr:
            seconds = f"{magr['quant_s']:.0f}"
            if "reconstruction_s" in magr:
                seconds += f" (recon {magr['reconstruction_s']:.0f})"
        # † a GPTQ run that read a β override meant for MagR (runs made before --set-magr)
        dagger = "†" if gptq and gptq["config"].get("beta") not in (None, 1.0) else ""
        lines.append(
            f"| W{cell[1:].replace('g', ' g')} | {LABELS.get(variant, variant)} | "
            f"{format(gptq['ppl'], ',.2f') + dagger if gptq else ''} | "
            f"{format(magr['ppl'], ',.2f') if magr else ''} | {seconds} | "
            f"{' · '.join(retries)} |"
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
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these jobs, in this order")
    p.add_argument("--table-only", action="store_true", help="print the table of finished runs")
    args = p.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        todo = jobs(args.bits, args.group_sizes, args.factors)
        if args.only:
            unknown = sorted(set(args.only) - set(todo))
            if unknown:
                p.error(f"unknown job {unknown[0]}; the jobs are {', '.join(todo)}")
            todo = {name: todo[name] for name in args.only}
        with ThreadPoolExecutor(args.jobs) as pool:
            for f in [
                pool.submit(run_one, n, a, args.out_dir, args.threads) for n, a in todo.items()
            ]:
                f.result()
    print(table(args.out_dir))


if __name__ == "__main__":
    main()
