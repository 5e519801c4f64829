"""The W2 reconstruction frontier (issue 21): perplexity against quantize time, by calibration
source and token count, schedule, trained norms and the end-to-end stage, on SmolLM2-135M.

Each variant is one `benchmarks/quantizers_smollm2.py` run of MagR+GPTQ+recon (its perplexity:
8,192 tokens of GSM8K questions with their solutions), its JSON kept in --out-dir so that a
second call resumes; then the table is printed for BENCHMARKS.md. Held-out windows are the ones
that follow the calibration windows in the same source (another seed for `generated`) unless the
variant names another source.

    OMP_NUM_THREADS=1 python benchmarks/recon_frontier.py --only m10k128 gen128
    python benchmarks/recon_frontier.py --table-only
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


def _v(source: str, samples: int, *sets: str, seq_len: int = 256, held: int | None = None, **kw):
    args = ["--calib-source", *source.split("+"), "--calib-samples", str(samples)]
    args += ["--calib-seq-len", str(seq_len), "--heldout-samples", str(held or samples // 4)]
    if kw.get("heldout_source"):
        args += ["--heldout-source", *kw["heldout_source"].split("+")]
    if sets:
        args += ["--set", *sets]
    return args


OLD = ("recon_epochs=2", "recon_lr_code=0.01", "recon_lr_scale=0.001", "recon_e2e_epochs=0")
NEW_BLOCKS = ("recon_epochs=4", "recon_lr_code=0.03", "recon_lr_scale=0.003")

# name -> (label, quantizers_smollm2.py arguments after the method). A label names what differs
# from today's defaults (block-wise 4 epochs at code lr 3e-2 / scale lr 3e-3, then the end-to-end
# stage 2 epochs at lr 3e-3); "old" is the schedule before issue 21's second round.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": ("Math10K 64×256, today's defaults", _v("math10k", 64)),
    "m10k64": (
        "Math10K 64×256, old schedule (2 epochs, code lr 1e-2, no e2e)",
        _v("math10k", 64, *OLD),
    ),
    "m10k64-e4-lr3": (
        "Math10K 64×256, no end-to-end stage",
        _v("math10k", 64, *NEW_BLOCKS, "recon_e2e_epochs=0"),
    ),
    "m10k64-e4-lr10": (
        "Math10K 64×256, code lr 1e-1, scale lr 1e-2, no end-to-end stage",
        _v("math10k", 64, "recon_lr_code=0.1", "recon_lr_scale=0.01", "recon_e2e_epochs=0"),
    ),
    "m10k64-e2e": (
        "Math10K 64×256, old block-wise schedule, end-to-end at lr 1e-3",
        _v("math10k", 64, *OLD[:3], "recon_e2e_epochs=2", "recon_e2e_lr=0.001"),
    ),
    "m10k64-e2e-lr3": (
        "Math10K 64×256, old block-wise schedule",
        _v("math10k", 64, *OLD[:3], "recon_e2e_epochs=2", "recon_e2e_lr=0.003"),
    ),
    "m10k64-e4-lr3-e2e": (
        "Math10K 64×256, end-to-end at lr 1e-3",
        _v("math10k", 64, *NEW_BLOCKS, "recon_e2e_epochs=2", "recon_e2e_lr=0.001"),
    ),
    "m10k64-e2e4": ("Math10K 64×256, end-to-end 4 epochs", _v("math10k", 64, "recon_e2e_epochs=4")),
    "m10k32": ("Math10K 32×256", _v("math10k", 32)),
    "m10k128": ("Math10K 128×256", _v("math10k", 128)),
    "gen64": ("generated 64×256 (held out: another seed's)", _v("generated", 64)),
    "gen64-m10k": (
        "generated 64×256, held out: 16 Math10K windows",
        _v("generated", 64, heldout_source="math10k"),
    ),
    "gen128": ("generated 128×256", _v("generated", 128)),
    "m10k128-norms": ("Math10K 128×256, norms trained too", _v("math10k", 128, "recon_norms=true")),
}


def run_one(
    name: str, args: list[str], out_dir: Path, threads: int, cache: Path, save: bool = False
) -> None:
    out = out_dir / f"{name}.json"
    if out.exists():
        return
    cmd = [sys.executable, str(HERE / "quantizers_smollm2.py"), "--bits", "2", "--group-size"]
    cmd += ["64", "--methods", "MagR+GPTQ+recon", "--threads", str(threads)]
    cmd += ["--calib-cache", str(cache), *args, "--out", str(out_dir / f"{name}.partial.json")]
    if save:
        cmd += ["--save-dir", str(out_dir / f"{name}-model")]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(out_dir / f"{name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    (out_dir / f"{name}.partial.json").replace(out)
    print(f"{name}: done", flush=True)


def table(out_dir: Path) -> str:
    """One line per finished variant: perplexity, quantize seconds (reconstruction's share),
    the end-to-end stage's seconds, and the mean held-out block error before → after."""
    lines = [
        "| variant | calibration | W2 g64 ppl | quantize s (recon; end-to-end) | blocks kept |",
        "|---|---|---:|---:|---:|",
    ]
    for name, (label, _) in VARIANTS.items():
        path = out_dir / f"{name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        row = next(r for r in data["rows"] if r["bits"] < 32)
        recon = row.get("reconstruction") or []
        kept = sum(r["kept"] for r in recon)
        e2e = f"; {row['e2e']['seconds']:.0f}" if row.get("e2e") else ""
        lines.append(
            f"| {name} | {label} | {row['ppl']:,.2f} | {row['quant_s']:.0f} "
            f"({row.get('reconstruction_s', 0):.0f}{e2e}) | {kept}/{len(recon)} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these variants, in this order")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out-dir", type=Path, default=Path("runs/recon-frontier"))
    p.add_argument("--calib-cache", type=Path, default=Path("runs/calib-cache"))
    p.add_argument("--table-only", action="store_true", help="print the table of finished runs")
    p.add_argument("--save", action="store_true", help="keep each quantized model (NAME-model/)")
    args = p.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        names = args.only or list(VARIANTS)
        unknown = sorted(set(names) - set(VARIANTS))
        if unknown:
            p.error(f"unknown variant {unknown[0]}; the variants are {', '.join(VARIANTS)}")
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [
                pool.submit(
                    run_one,
                    n,
                    VARIANTS[n][1],
                    args.out_dir,
                    args.threads,
                    args.calib_cache,
                    args.save,
                )
                for n in names
            ]
            for f in futures:
                f.result()
    print(table(args.out_dir))


if __name__ == "__main__":
    main()
