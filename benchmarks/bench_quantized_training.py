"""Quantized fine-tuning on SmolLM2-135M: DiaBlo against QLoRA, GPTQ-LoRA, NF2-LoRA and 16-bit.

Every method trains through the real harness (`qdiablo.train.train`, HF Trainer, gradient
checkpointing on) on the shipped Math10K records, each run in its own subprocess, because peak
RSS only grows within a process. Runs are interleaved (round-robin, order rotated each repeat) so
that machine noise hits all methods alike; medians are reported, plus ratios to QLoRA at the same
setting:

- matched: DiaBlo N=64 against LoRA at the rank with the same trainable-parameter count;
- paper:   DiaBlo N=64 against LoRA r=64 (the papers' comparison, not matched).

Measured per run: training tokens/s (non-padding tokens, first step excluded), peak RSS while
training (the kernel's high-water mark is reset when training starts) and while loading, and the
resident bytes of the base's linear layers (packed integers + scales/zeros, or bitsandbytes'
packed bytes + statistics, or float weights).

    python benchmarks/bench_quantized_training.py                      # everything
    python benchmarks/bench_quantized_training.py --repeats 1 --steps 4 --methods qlora diablo-nf4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
# name: (base, bits, adapter)
METHODS = {
    "diablo-16bit": ("fp", 16, "diablo"),
    "lora-16bit": ("fp", 16, "lora"),
    "qlora": ("nf4", 4, "lora"),
    "diablo-nf4": ("nf4", 4, "diablo"),
    "gptq-lora-4bit": ("rtn4", 4, "lora"),
    "diablo-packed-4bit": ("rtn4", 4, "diablo"),
    "nf2-lora": ("nf2", 2, "lora"),
    "diablo-nf2": ("nf2", 2, "diablo"),
    "gptq-lora-2bit": ("rtn2", 2, "lora"),
    "diablo-packed-2bit": ("rtn2", 2, "diablo"),
}
REFERENCE = {4: "qlora", 16: "lora-16bit", 2: "nf2-lora"}


# --------------------------------------------------------------------------------------------
# Worker: one training run in this process
# --------------------------------------------------------------------------------------------


def worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    from qdiablo.train import TrainConfig, train

    base = spec["base"]
    kind = {"rtn4": "rtn", "rtn2": "rtn"}.get(base, base)
    config = TrainConfig(
        model=spec["model_dirs"][base],
        base=kind,
        dtype=spec["dtype"],
        adapter=spec["adapter"],
        num_blocks=64 if spec["adapter"] == "diablo" or spec["setting"] == "matched" else None,
        rank=64 if spec["adapter"] == "lora" and spec["setting"] == "paper" else None,
        match_params=spec["adapter"] == "lora" and spec["setting"] == "matched",
        max_records=spec["batch_size"] * spec["steps"],
        max_length=spec["max_length"],
        batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        gradient_checkpointing=True,
        save_steps=0,
        logging_steps=1,
        progress=False,
        seed=0,
        output=spec["output"],
    )
    result = train(config).results
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# Parent: prepare the bases once, run the workers, tabulate
# --------------------------------------------------------------------------------------------


def prepare_bases(cache: Path, need_packed: bool, threads: int) -> dict[str, str]:
    """A float HF folder of SmolLM2 (fast to load, unlike the GGUF) and packed RTN folders."""
    fp_dir = cache / "smollm2-fp32"
    dirs = {"fp": str(fp_dir), "nf4": str(fp_dir), "nf2": str(fp_dir)}
    if not (fp_dir / "config.json").is_file():
        code = (
            "from qdiablo.models import load_model, load_tokenizer;"
            f"load_model('smollm2').save_pretrained({str(fp_dir)!r});"
            f"load_tokenizer('smollm2').save_pretrained({str(fp_dir)!r})"
        )
        subprocess.run([sys.executable, "-c", code], check=True, env=_env(threads))
    if need_packed:
        for bits in (4, 2):
            out = cache / f"smollm2-rtn{bits}-g64"
            dirs[f"rtn{bits}"] = str(out)
            if not (out / "config.json").is_file():
                code = (
                    "from qdiablo.models import load_model, load_tokenizer;"
                    "from quantizers import QuantConfig, quantize_model, save_quantized;"
                    f"m = load_model({str(fp_dir)!r});"
                    f"quantize_model(m, None, QuantConfig(method='rtn', bits={bits}, "
                    "group_size=64));"
                    f"save_quantized(m, {str(out)!r}, load_tokenizer({str(fp_dir)!r}))"
                )
                subprocess.run([sys.executable, "-c", code], check=True, env=_env(threads))
    return dirs


def _env(threads: int) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def run_worker(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(spec["threads"]))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{spec['name']} failed:\n{proc.stderr[-4000:]}")


def packed_available() -> bool:
    try:
        from quantizers import load_quantized  # noqa: F401
    except ImportError:
        return False
    return True


def summarize(runs: dict[tuple[str, str], list[dict]]) -> list[dict]:
    rows = []
    for (name, setting), results in runs.items():
        _, bits, adapter = METHODS[name]
        tps = [r["throughput"]["tokens_per_second"] for r in results]
        peak = [r["throughput"]["peak_rss_bytes"] for r in results]
        load_peak = [r["throughput"]["peak_rss_before_train_bytes"] for r in results]
        rows.append(
            {
                "method": name,
                "setting": setting,
                "bits": bits,
                "adapter": adapter,
                "setting_detail": f"N={results[0]['budget']['num_blocks']}"
                if adapter == "diablo"
                else f"r={results[0]['budget']['rank']}",
                "trainable": results[0]["trainable_parameters"],
                "tokens_per_s": statistics.median(tps),
                "tokens_per_s_all": tps,
                "peak_rss_train_mb": statistics.median(peak) / 2**20,
                "peak_rss_load_mb": statistics.median(load_peak) / 2**20,
                "linear_mb": results[0]["base_linear_layers"]["bytes"] / 2**20,
            }
        )
    by_key = {(r["method"], r["setting"]): r for r in rows}
    for r in rows:
        ref = by_key.get((REFERENCE[r["bits"]], r["setting"]))
        if r["bits"] == 4 and ref is None:
            ref = by_key.get(("qlora", "matched"))
        if ref:
            r["vs"] = ref["method"]
            r["speed_ratio"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["memory_ratio"] = r["peak_rss_train_mb"] / ref["peak_rss_train_mb"]
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| method | bits | setting | adapter | trainable | tokens/s | × ref | peak RSS train MB "
        "| × ref | peak RSS load MB | linear layers MB |\n" + "|---" * 11 + "|"
    )
    lines = [head]
    for r in sorted(rows, key=lambda r: (-r["bits"], r["setting"], r["method"])):
        ratio = f"{r['speed_ratio']:.2f} ({r['vs']})" if "speed_ratio" in r else "—"
        mem = f"{r['memory_ratio']:.2f}" if "memory_ratio" in r else "—"
        lines.append(
            f"| {r['method']} | {r['bits']} | {r['setting']} | {r['setting_detail']} | "
            f"{r['trainable']:,} | {r['tokens_per_s']:.0f} | {ratio} | "
            f"{r['peak_rss_train_mb']:.0f} | {mem} | {r['peak_rss_load_mb']:.0f} | "
            f"{r['linear_mb']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--settings", nargs="+", default=["matched", "paper"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per run (first untimed)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="compute dtype of every base (bnb compute dtype, dequantized packed weights, the "
        "float weights of the 16-bit references); adapters train in float32",
    )
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "qdiablo-bench"))
    p.add_argument("--json", default=None, help="write all runs and the summary here")
    args = p.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    methods = list(args.methods)
    if not packed_available():
        skipped = [m for m in methods if METHODS[m][0].startswith("rtn")]
        methods = [m for m in methods if m not in skipped]
        print(f"quantizers.load_quantized unavailable: skipping {', '.join(skipped)}")
    need_packed = any(METHODS[m][0].startswith("rtn") for m in methods)
    model_dirs = prepare_bases(cache, need_packed, args.threads)
    jobs = [
        (m, s)
        for m in methods
        for s in args.settings
        if not (METHODS[m][2] == "diablo" and s == "paper")  # DiaBlo runs N=64 in both
    ]
    if not jobs:
        raise SystemExit("nothing to run")
    runs: dict[tuple[str, str], list[dict]] = {job: [] for job in jobs}
    started = time.time()
    for repeat in range(args.repeats):
        order = jobs[repeat % len(jobs) :] + jobs[: repeat % len(jobs)]
        for name, setting in order:
            base, bits, adapter = METHODS[name]
            spec = {
                "name": name,
                "base": base,
                "bits": bits,
                "adapter": adapter,
                "setting": setting,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "max_length": args.max_length,
                "threads": args.threads,
                "dtype": args.dtype,
                "model_dirs": model_dirs,
                "output": str(cache / "runs" / f"{name}-{setting}-{repeat}-{os.getpid()}"),
            }
            t = time.time()
            result = run_worker(spec)
            runs[(name, setting)].append(result)
            print(
                f"[{repeat + 1}/{args.repeats}] {name:20s} {setting:8s} "
                f"{result['throughput']['tokens_per_second']:7.1f} tok/s  "
                f"peak {result['throughput']['peak_rss_bytes'] / 2**20:6.0f} MB  "
                f"({time.time() - t:.0f} s)",
                flush=True,
            )
    for job in jobs:  # DiaBlo's single setting is shown in both comparisons
        if METHODS[job[0]][2] == "diablo" and "paper" in args.settings:
            runs[(job[0], "paper")] = runs[job]
    rows = summarize(runs)
    print(
        f"\nSmolLM2-135M-Instruct, CPU ({platform.processor() or platform.machine()}, "
        f"{args.threads} threads), {args.dtype} compute, "
        f"batch {args.batch_size} × ≤{args.max_length} tokens, "
        f"{args.steps} steps, gradient checkpointing, {args.repeats} interleaved repeats, "
        f"{time.time() - started:.0f} s total\n"
    )
    print(table(rows))
    by = {(r["method"], r["setting"]): r for r in rows}
    for name in ("diablo-packed-4bit", "diablo-nf4"):
        r = by.get((name, "matched"))
        if r and "speed_ratio" in r:
            print(
                f"{name} vs QLoRA (matched): speed ×{r['speed_ratio']:.2f} (target ≥ 1), "
                f"peak memory ×{r['memory_ratio']:.2f} (target ≤ 1)"
            )
    two, four = by.get(("diablo-packed-2bit", "matched")), by.get(("diablo-packed-4bit", "matched"))
    if two and four:
        print(
            f"packed 2-bit / 4-bit linear-layer bytes: {two['linear_mb'] / four['linear_mb']:.3f} "
            "(target ≤ 0.6)"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"rows": rows, "runs": {f"{k[0]}/{k[1]}": v for k, v in runs.items()}}, indent=1
            )
        )


if __name__ == "__main__":
    main()
