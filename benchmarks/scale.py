"""Peak host memory of each verb at three sizes on the CPU, against the bounds of docs/scale.md.
(Over 400 lines: the bounds and one measuring function per verb in one script, as the planner's
train/eval rows will join it.)

    python benchmarks/scale.py --work /work/runs/scale            # every size and verb
    python benchmarks/scale.py --work /work/runs/scale --sizes 0.3b --verbs quantize-rtn
    python benchmarks/scale.py --bounds-only                      # the formulas at 7B and 70B

Sizes: `135m` is SmolLM2-135M-Instruct (the embedded GGUF's weights, saved once as a bfloat16
safetensors folder so that quantize streams it like any checkpoint), `0.3b` and `1.1b` are the
seeded random LLaMA checkpoints of benchmarks/synthetic_llama.py (TinyLlama's shape for 1.1b).

Each verb runs as `python -m qdiablo ...` in its own process, one torch thread, and its peak RSS
is read from the kernel (wait4's ru_maxrss), so the table holds what a user's process peaks at,
imports included. One function per verb (`verb_*`) returns a `Row`; `VERBS` maps names to them
and the table in BENCHMARKS.md is `markdown(rows)`. Results accumulate in WORK/results.json: a
row already measured is not measured again unless --force names its verb.

Bounds (bytes; docs/scale.md writes them out and evaluates them at 70B):
    P  packed model as saved (codes, zeros, fp16 scales, g_idx; embeddings, norms, head)
    B  one decoder block in float32;  H  its Hessians (float32, one per input group) and
       GPTQ's three working copies of the largest
    A  calibration activations: windows × tokens × hidden × bytes of the activation dtype
    quantize, on the CPU (host and device are one):  P + 2B + H + 3A + 1.5 GiB
    export --merged:       P + S + M + B + 1.5 GiB   (S: one shard; M: one block merged)
    export --requantize:   2P + S + M + 2B + H + 3A + 1.5 GiB
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GiB = 1024**3
OVERHEAD = 1.5 * GiB  # interpreter, torch, transformers, allocator slack (docs/scale.md)
SIZES = ("135m", "0.3b", "1.1b")
GPTQ_WINDOWS, GPTQ_SEQ = 8, 256  # "a few windows": the CPU cost of GPTQ is in the weights
EXPORT_SHARD = "1GB"  # merged/ shards in the export rows (the default is 5GB)


# ---------------------------------------------------------------------------------------------
# The bounds (docs/scale.md)
# ---------------------------------------------------------------------------------------------


@dataclass
class Shape:
    """What the bounds need of a model: its decoder block's linear layers and the rest."""

    hidden: int
    layers: int
    linears: list[tuple[str, int, int]]  # (name, in, out) of one block
    block_other: int  # other parameters of one block (norms)
    outside: int  # parameters outside the blocks (embeddings, final norm, head once if tied)
    params: int

    @classmethod
    def of(cls, config) -> Shape:
        import torch
        from torch import nn
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        from quantizers.calibration import find_decoder_blocks

        _, blocks = find_decoder_blocks(model)
        block = blocks[0]
        linears = [
            (n, m.in_features, m.out_features)
            for n, m in block.named_modules()
            if isinstance(m, nn.Linear)
        ]
        in_linears = {f"{n}.weight" for n, _, _ in linears}
        other = sum(p.numel() for n, p in block.named_parameters() if n not in in_linears)
        unique = {id(p): p for p in model.parameters()}
        total = sum(p.numel() for p in unique.values())
        in_blocks = sum(p.numel() for p in blocks.parameters())
        return cls(config.hidden_size, len(blocks), linears, other, total - in_blocks, total)


def packed_bytes(shape: Shape, bits: int, group: int, float_bytes: int) -> int:
    """P: the packed model as save_quantized writes it."""
    per_block = float_bytes * shape.block_other
    for _, n_in, n_out in shape.linears:
        groups = 1 if group == -1 else -(-n_in // group)
        per_block += n_in * n_out * bits // 8 + groups * n_out * (2 + bits / 8) + 4 * n_in
    return int(shape.layers * per_block + float_bytes * shape.outside)


def block_fp32(shape: Shape) -> int:
    """B: one decoder block in float32."""
    return 4 * (sum(i * o for _, i, o in shape.linears) + shape.block_other)


def hessian_bytes(shape: Shape) -> int:
    """H: the block's Hessians, one float32 in×in matrix per group of layers reading the same
    input (same parent module, same in_features: q/k/v, gate/up), plus GPTQ's three working
    copies of the largest (its own copy, the damped inverse, that inverse's Cholesky factor)."""
    groups = {(n.rpartition(".")[0], i) for n, i, _ in shape.linears}
    largest = max(i for _, i in groups)
    return 4 * (sum(i * i for _, i in groups) + 3 * largest * largest)


def activation_bytes(shape: Shape, windows: int, seq: int, act_bytes: int) -> int:
    """A: the calibration activations, one hidden vector per token."""
    return windows * seq * shape.hidden * act_bytes


def quantize_bound(shape, bits, group, windows, seq, float_bytes=4, act_bytes=4) -> dict:
    """Host and device bounds of `qdiablo quantize` (docs/scale.md); on the CPU they add up."""
    P = packed_bytes(shape, bits, group, float_bytes)
    B, H = block_fp32(shape), hessian_bytes(shape)
    A = activation_bytes(shape, windows, seq, act_bytes)
    return {
        "P": P,
        "B": B,
        "H": H,
        "A": A,
        "host": P + 2 * B + A + OVERHEAD,
        "device": 2 * B + H + 3 * A,
        "device_reconstruct": max(2 * B + H, 6 * B) + 3 * A,
        "cpu": P + 2 * B + H + 3 * A + OVERHEAD,  # one memory: the host's 2B are the device's
    }


def export_bound(shape, bits, group, shard, merged_bytes=2, requant=None) -> dict:
    """`qdiablo export --merged` (and --requantize: `requant` = (windows, seq)) on the CPU."""
    P = packed_bytes(shape, bits, group, 4)
    M = merged_bytes * (sum(i * o for _, i, o in shape.linears) + shape.block_other)
    B = block_fp32(shape)
    bound = P + shard + M + B + OVERHEAD
    if requant is not None:
        q = quantize_bound(shape, bits, group, *requant)
        bound += q["P"] + B + q["H"] + 3 * q["A"]
    return {"P": P, "M": M, "B": B, "cpu": bound}


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    size: str
    verb: str
    params: int
    peak_gib: float
    bound_gib: float
    wall_s: float
    command: str
    terms: dict = field(default_factory=dict)
    note: str = ""

    @property
    def within(self) -> bool:
        return self.peak_gib <= self.bound_gib


def measured(argv: list[str], log: Path) -> tuple[float, float]:
    """Run `argv` with one thread; (peak RSS GiB, wall seconds). A failure stops the script."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU figures, whatever the machine has
    start = time.time()
    with open(log, "w") as f:
        child = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed; see {log}")
    return usage.ru_maxrss * 1024 / GiB, time.time() - start


def qdiablo(*args: str) -> list[str]:
    return [sys.executable, "-m", "qdiablo", *args]


@dataclass
class Context:
    work: Path

    def model(self, size: str) -> Path:
        """The checkpoint folder of `size`, written on first use."""
        folder = self.work / "models" / size
        if (folder / "config.json").is_file():
            return folder
        if size == "135m":
            code = (
                "from qdiablo.models import load_model, load_tokenizer; import torch;"
                "m = load_model('smollm2', dtype=torch.bfloat16);"
                f"m.save_pretrained({str(folder)!r});"
                f"load_tokenizer('smollm2').save_pretrained({str(folder)!r})"
            )
            subprocess.run([sys.executable, "-c", code], check=True, env=_env())
        else:
            script = REPO / "benchmarks" / "synthetic_llama.py"
            argv = [sys.executable, str(script), "--size", size, "--output", str(folder)]
            subprocess.run(argv, check=True, env=_env())
        return folder

    def shape(self, size: str) -> Shape:
        from transformers import AutoConfig

        return Shape.of(AutoConfig.from_pretrained(self.model(size)))


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _quantize(ctx: Context, size: str, method: str) -> tuple[Path, list[str], dict]:
    out = ctx.work / "quantized" / f"{size}-{method}"
    argv = ["quantize", "--model", str(ctx.model(size)), "--output", str(out), "--overwrite"]
    argv += ["--method", method, "--bits", "4", "--group-size", "128", "--device", "cpu"]
    windows = 0
    if method == "gptq":
        windows = GPTQ_WINDOWS
        argv += ["--calib-samples", str(windows), "--calib-seq-len", str(GPTQ_SEQ)]
    bound = quantize_bound(ctx.shape(size), 4, 128, windows, GPTQ_SEQ)
    return out, argv, bound


def verb_quantize_rtn(ctx: Context, size: str) -> Row:
    return _quantize_row(ctx, size, "rtn")


def verb_quantize_gptq(ctx: Context, size: str) -> Row:
    return _quantize_row(ctx, size, "gptq")


def _quantize_row(ctx: Context, size: str, method: str) -> Row:
    _, argv, bound = _quantize(ctx, size, method)
    peak, wall = measured(qdiablo(*argv), ctx.work / f"{size}-quantize-{method}.log")
    return Row(
        size,
        f"quantize --method {method}",
        ctx.shape(size).params,
        peak,
        bound["cpu"] / GiB,
        wall,
        "qdiablo " + " ".join(argv[:1] + argv[5:]),
        {k: v / GiB for k, v in bound.items()},
    )


def verb_quantize_whole(ctx: Context, size: str) -> Row:
    """The path `qdiablo quantize` took before it streamed: the whole model loaded in float32."""
    out = ctx.work / "quantized" / f"{size}-rtn-whole"
    code = (
        "from qdiablo.models import load_base, load_tokenizer;"
        "from quantizers import QuantConfig, quantize_model, save_quantized;"
        f"m = load_base({str(ctx.model(size))!r}, 'fp');"
        "quantize_model(m, None, QuantConfig(method='rtn', bits=4, group_size=128));"
        f"save_quantized(m, {str(out)!r}, load_tokenizer({str(ctx.model(size))!r}))"
    )
    peak, wall = measured([sys.executable, "-c", code], ctx.work / f"{size}-quantize-whole.log")
    bound = quantize_bound(ctx.shape(size), 4, 128, 0, 0)
    return Row(
        size,
        "quantize --method rtn, whole model (before)",
        ctx.shape(size).params,
        peak,
        bound["cpu"] / GiB,
        wall,
        "load_base + quantize_model + save_quantized",
        {k: v / GiB for k, v in bound.items()},
        note="the path before streaming, for comparison",
    )


def _adapter(ctx: Context, size: str, base: Path) -> Path:
    """A DiaBlo adapter (N=64, seeded random blocks) on `base`, written once."""
    folder = ctx.work / "adapters" / size
    if (folder / "adapter_config.json").is_file():
        return folder
    code = (
        "import torch; from qdiablo.models import load_packed;"
        "from qdiablo.diablo import DiaBloConfig, get_diablo_model;"
        f"m = get_diablo_model(load_packed({str(base)!r}), DiaBloConfig(num_blocks=64));"
        "torch.manual_seed(0);"
        "[l.blocks.data.normal_(0, 1e-3) for _, l in m.diablo_layers()];"
        f"m.save_pretrained({str(folder)!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())
    return folder


def _export_row(ctx: Context, size: str, requantize: bool) -> Row:
    base, _, _ = _quantize(ctx, size, "rtn")
    if not (base / "quantize_config.json").is_file():
        verb_quantize_rtn(ctx, size)
    adapter = _adapter(ctx, size, base)
    kind = "requantize" if requantize else "merged"
    out = ctx.work / "exports" / f"{size}-{kind}"
    argv = ["export", "--base", str(base), "--adapter", str(adapter), "--output", str(out)]
    argv += ["--overwrite", "--merged", "--max-shard-size", EXPORT_SHARD, "--device", "cpu"]
    requant = None
    if requantize:
        calib = ctx.work / "calib.txt"
        if not calib.is_file():
            from qdiablo.calibration import calibration_texts

            calib.write_text("\n\n".join(calibration_texts()[:400]), encoding="utf-8")
        argv += ["--requantize", "--calib", str(calib), "--method", "rtn"]
        argv += ["--calib-samples", str(GPTQ_WINDOWS), "--calib-seq-len", str(GPTQ_SEQ)]
        requant = (GPTQ_WINDOWS, GPTQ_SEQ)
    peak, wall = measured(qdiablo(*argv), ctx.work / f"{size}-export-{kind}.log")
    shard = int(EXPORT_SHARD.removesuffix("GB")) * 10**9
    bound = export_bound(ctx.shape(size), 4, 128, shard, requant=requant)
    return Row(
        size,
        f"export --merged{' --requantize (rtn)' if requantize else ''}",
        ctx.shape(size).params,
        peak,
        bound["cpu"] / GiB,
        wall,
        "qdiablo export --merged --max-shard-size 1GB" + (" --requantize" if requantize else ""),
        {k: v / GiB for k, v in bound.items()},
    )


def verb_export_merged(ctx: Context, size: str) -> Row:
    return _export_row(ctx, size, requantize=False)


def verb_export_requantize(ctx: Context, size: str) -> Row:
    return _export_row(ctx, size, requantize=True)


def bound_of(verb: str, shape: Shape) -> dict:
    """The bound (and its terms) of a row measured by VERBS[verb]: what each verb function
    computes, again, so that a table of old measurements shows today's formulas."""
    shard = int(EXPORT_SHARD.removesuffix("GB")) * 10**9
    return {
        "quantize-rtn": lambda: quantize_bound(shape, 4, 128, 0, GPTQ_SEQ),
        "quantize-gptq": lambda: quantize_bound(shape, 4, 128, GPTQ_WINDOWS, GPTQ_SEQ),
        "quantize-whole": lambda: quantize_bound(shape, 4, 128, 0, 0),
        "export-merged": lambda: export_bound(shape, 4, 128, shard),
        "export-requantize": lambda: export_bound(
            shape, 4, 128, shard, requant=(GPTQ_WINDOWS, GPTQ_SEQ)
        ),
    }[verb]()


VERBS = {
    "quantize-rtn": verb_quantize_rtn,
    "quantize-gptq": verb_quantize_gptq,
    "quantize-whole": verb_quantize_whole,
    "export-merged": verb_export_merged,
    "export-requantize": verb_export_requantize,
}


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def markdown(rows: list[Row]) -> str:
    """The table: each verb's peak against its bound, with P (packed) and 4·params (the whole
    model in float32) beside it to show which one the peak follows."""
    lines = [
        "| size | verb | peak RSS GiB | bound GiB | within | P GiB | 4·params GiB | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        packed = r.terms.get("P")
        lines.append(
            f"| {r.size} ({r.params / 1e9:.2f} B) | {r.verb} | {r.peak_gib:.2f} | "
            f"{r.bound_gib:.2f} | {'yes' if r.within else '**no**'} | "
            f"{'' if packed is None else f'{packed:.2f}'} | {4 * r.params / GiB:.2f} | "
            f"{r.wall_s:.0f} |"
        )
    return "\n".join(lines)


def bounds_at_scale() -> str:
    """The formulas at LLaMA-2-7B and LLaMA-3-70B (bf16 checkpoints, 128 × 2048 windows)."""
    from transformers import LlamaConfig

    specs = {
        "LLaMA-2-7B W4 g128": (dict(hidden_size=4096, intermediate_size=11008,
                                    num_hidden_layers=32, num_attention_heads=32,
                                    num_key_value_heads=32, vocab_size=32000), 4, 128),
        "LLaMA-3-70B W2 g64": (dict(hidden_size=8192, intermediate_size=28672,
                                    num_hidden_layers=80, num_attention_heads=64,
                                    num_key_value_heads=8, vocab_size=128256), 2, 64),
    }  # fmt: skip
    lines = [
        "| model | P | B | H | A (bf16) | host bound | device bound | device, reconstruct |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (spec, bits, group) in specs.items():
        shape = Shape.of(LlamaConfig(**spec, tie_word_embeddings=False))
        b = quantize_bound(shape, bits, group, 128, 2048, float_bytes=2, act_bytes=2)
        cells = [b[k] / GiB for k in ("P", "B", "H", "A", "host", "device", "device_reconstruct")]
        lines.append(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/scale"))
    p.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    p.add_argument("--verbs", nargs="+", choices=list(VERBS), default=list(VERBS))
    p.add_argument("--force", nargs="*", default=[], help="verbs to measure again")
    p.add_argument("--bounds-only", action="store_true")
    p.add_argument("--table", action="store_true", help="print the table of WORK/results.json")
    args = p.parse_args()
    if args.bounds_only:
        print(bounds_at_scale())
        return
    args.work.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.work)
    results_file = args.work / "results.json"
    rows = (
        [Row(**r) for r in json.loads(results_file.read_text())] if results_file.is_file() else []
    )
    names = {f.__name__: verb for verb, f in VERBS.items()}
    for r in rows:  # today's formulas for every row, whenever it was measured
        bound = bound_of(names[r.terms["_fn"]], ctx.shape(r.size))
        r.bound_gib = bound["cpu"] / GiB
        r.terms.update({k: v / GiB for k, v in bound.items()})
    for size in [] if args.table else args.sizes:
        for verb in args.verbs:
            key = (size, VERBS[verb].__name__)
            done = [r for r in rows if (r.size, r.terms.get("_fn")) == key]
            if done and verb not in args.force:
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {size} {verb} ...", flush=True)
            row = VERBS[verb](ctx, size)
            row.terms["_fn"] = VERBS[verb].__name__
            rows = [r for r in rows if (r.size, r.terms.get("_fn")) != key] + [row]
            results_file.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
            print(f"  peak {row.peak_gib:.2f} GiB (bound {row.bound_gib:.2f}), {row.wall_s:.0f} s")
    order = {s: i for i, s in enumerate(SIZES)}
    rows.sort(key=lambda r: (order[r.size], r.verb))
    print(markdown(rows))


if __name__ == "__main__":
    main()
