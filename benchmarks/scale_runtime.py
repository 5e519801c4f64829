"""Peak host memory of `qdiablo train` (2 steps) and `qdiablo eval` (2 items) on the CPU at three
sizes, beside the memory planner's prediction (`qdiablo plan`, qdiablo.memory): issue 19, item 7.

    python benchmarks/scale_runtime.py --work WORK --model 0.3b=SYNTH_0.3B --model 1.1b=SYNTH_1.1B
    python benchmarks/scale_runtime.py --work WORK --markdown     # the table of saved results

Sizes: `135m` is SmolLM2-135M-Instruct (the embedded GGUF); the others are seeded random
LLaMA-shaped checkpoints (benchmarks/synthetic_llama.py: 0.3b, and TinyLlama's shape for 1.1b),
given as SIZE=FOLDER. Each is quantized once (RTN, 4 bits, group 128) into WORK/q-SIZE, then:

- train: `qdiablo train --base rtn`, DiaBlo N=64 on the default targets, 2 optimizer steps of
  2 examples, 256 tokens each (records longer than that, so every example is exactly 256), on the
  CPU with its defaults (fp32, no checkpointing);
- eval: `qdiablo eval` of the first 2 GSM8K items, 16 new tokens, with the reference NLL, with
  the dequantized cache off and on.

Each command runs as `python -m qdiablo ...` in its own process with one torch thread; its peak
RSS comes from the kernel (wait4's ru_maxrss), imports included. The prediction is the planner's
CPU host peak for exactly that setup (its runtime constant included). Results accumulate in
WORK/runtime-results.json; `--markdown` prints the table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.scale import measured, qdiablo  # noqa: E402 (after the sys.path line)

GiB = 1024**3
BITS, GROUP, BLOCKS = 4, 128, 64
STEPS, BATCH, LENGTH = 2, 2, 256
ITEMS, NEW_TOKENS = 2, 16


@dataclass
class Row:
    size: str
    verb: str
    measured_gib: float
    predicted_gib: float
    wall_s: float
    command: str

    @property
    def ratio(self) -> float:
        return self.measured_gib / self.predicted_gib


def quantized(work: Path, size: str, model: str) -> Path:
    """WORK/q-SIZE: the model quantized once (RTN W4 g128, on the CPU)."""
    out = work / f"q-{size}"
    if not (out / "quantize_config.json").is_file():
        argv = ["quantize", "--model", model, "--output", str(out), "--overwrite"]
        argv += ["--method", "rtn", "--bits", str(BITS), "--group-size", str(GROUP)]
        measured(qdiablo(*argv), work / f"{size}-quantize.log")
    return out


def long_records(work: Path) -> Path:
    """Math10K-format records longer than LENGTH tokens in any tokenizer: every example is cut
    to exactly LENGTH tokens, so the step's size is known."""
    path = work / "long-records.jsonl"
    text = "A farmer has 17 sheep and buys 25 more, then sells a third of them. " * 30
    rows = [
        {"instruction": f"Question {i}: what is left?", "input": "", "output": text, "answer": "28"}
        for i in range(8)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def plan_for(folder: Path, **settings):
    from qdiablo.memory.plan import MemoryPlan
    from qdiablo.memory.settings import PlanSettings
    from qdiablo.memory.shapes import load_source

    base = dict(device="cpu", precision="fp32", dtype="float32", checkpointing=False)
    return MemoryPlan(load_source(str(folder)), PlanSettings(**{**base, **settings}))


def train_plan(folder: Path) -> float:
    plan = plan_for(folder, num_blocks=BLOCKS, micro_batch=BATCH, seq_len=LENGTH)
    return plan.train().host / GiB


def train_row(work: Path, size: str, folder: Path) -> Row:
    out = work / f"train-{size}"
    argv = ["train", "--base", "rtn", "--model", str(folder), "--output", str(out)]
    argv += ["--overwrite", "--data", str(long_records(work)), "--decontaminate", "none"]
    argv += ["--max-steps", str(STEPS), "--batch-size", str(BATCH), "--max-length", str(LENGTH)]
    argv += ["--num-blocks", str(BLOCKS), "--save-steps", "0", "--no-progress", "--device", "cpu"]
    peak, wall = measured(qdiablo(*argv), work / f"{size}-train.log")
    return Row(size, "train", peak, train_plan(folder), wall, "qdiablo " + " ".join(argv))


def eval_lengths(folder: Path) -> tuple[int, int]:
    """The longest prompt and reference response (tokens) of the evaluated items."""
    from eval.math10k import resolve_tasks
    from eval.nll import encode_references
    from qdiablo.data import encode_prompt
    from qdiablo.models import load_tokenizer

    tokenizer = load_tokenizer(str(folder))
    (task,) = resolve_tasks(["gsm8k"])
    records = task.records[:ITEMS]
    prompts = [len(encode_prompt(tokenizer, r.instruction, "alpaca")) for r in records]
    full = encode_references(tokenizer, records, "alpaca")
    references = [sum(label != -100 for label in e["labels"]) for e in full]
    return max(prompts), max(references)


def eval_row(work: Path, size: str, folder: Path, cache: str) -> Row:
    out = work / f"eval-{size}-{cache}"
    argv = ["eval", "--model", str(folder), "--output", str(out), "--overwrite", "--tasks"]
    argv += ["gsm8k", "--limit", str(ITEMS), "--max-new-tokens", str(NEW_TOKENS)]
    argv += ["--batch-size", str(ITEMS), "--dequant-cache", cache, "--device", "cpu"]
    argv += ["--no-progress", "--template", "alpaca"]
    peak, wall = measured(qdiablo(*argv), work / f"{size}-eval-{cache}.log")
    planned = eval_plan(folder, cache)
    return Row(size, f"eval (cache {cache})", peak, planned, wall, "qdiablo " + " ".join(argv))


def eval_plan(folder: Path, cache: str) -> float:
    prompt, reference = eval_lengths(folder)
    plan = plan_for(
        folder,
        eval_batch=ITEMS,
        eval_prompt=prompt,
        eval_new_tokens=NEW_TOKENS,
        eval_reference=reference,
        dequant_cache=cache == "on",
    )
    return plan.eval().host / GiB


def markdown(rows: list[Row]) -> str:
    lines = [
        "| size | verb | measured peak RSS GiB | planner GiB | measured / planner | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.size} | {r.verb} | {r.measured_gib:.2f} | {r.predicted_gib:.2f} | "
            f"{r.ratio:.2f} | {r.wall_s:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="folder for models, runs, results")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="SIZE=FOLDER",
        help="a checkpoint per size (135m is the embedded SmolLM2 unless given)",
    )
    p.add_argument("--sizes", nargs="+", default=None, help="only these sizes")
    p.add_argument("--markdown", action="store_true", help="print the table of saved results")
    p.add_argument(
        "--replan",
        action="store_true",
        help="recompute the planner's column of the saved results (the measurements stay)",
    )
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results_file = args.work / "runtime-results.json"
    saved = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if args.replan:
        for r in saved.values():
            folder = args.work / f"q-{r['size']}"
            cache = "on" if "cache on" in r["verb"] else "off"
            r["predicted_gib"] = (
                train_plan(folder) if r["verb"] == "train" else eval_plan(folder, cache)
            )
        results_file.write_text(json.dumps(saved, indent=1))
    if args.markdown or args.replan:
        print(markdown([Row(**r) for r in saved.values()]))
        return
    models = {"135m": "smollm2", **dict(m.split("=", 1) for m in args.model)}
    for size in args.sizes or list(models):
        folder = quantized(args.work, size, models[size])
        for row in (
            train_row(args.work, size, folder),
            eval_row(args.work, size, folder, "off"),
            eval_row(args.work, size, folder, "on"),
        ):
            saved[f"{row.size} {row.verb}"] = asdict(row)
            results_file.write_text(json.dumps(saved, indent=1))
            print(
                f"{row.size} {row.verb}: {row.measured_gib:.2f} GiB measured, "
                f"{row.predicted_gib:.2f} planned ({row.ratio:.2f})",
                flush=True,
            )
    print(markdown([Row(**r) for r in saved.values()]))


if __name__ == "__main__":
    main()
