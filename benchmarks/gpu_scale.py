"""benchmarks/gpu_suite.py's `scale` section (issue 19): a 1.1B LLaMA (TinyLlama's shape, seeded
random bf16 weights) through quantize, train and eval on the GPU, each phase's
`torch.cuda.max_memory_allocated` beside the memory planner's device prediction
(`qdiablo plan`, qdiablo.memory) for exactly that setup.

    python benchmarks/gpu_suite.py --only scale          # on a GPU
    python benchmarks/gpu_suite.py --only scale --smoke  # tiny shapes; runs on CPU (no figures)

Phases (each measured from a reset peak, less what was allocated before it):
- quantize: GPTQ 4-bit g128 of the whole model, blocks moved to the GPU one at a time, 8
  calibration windows of 512 tokens in bf16;
- train: `qdiablo.train.train` on the packed base with the GPU defaults (bf16, checkpointing),
  DiaBlo N=64, 2 steps at micro-batch 1 × 2048; then 1 step with the micro-batch the planner
  picks for this GPU (batch 8);
- eval: greedy generation and reference NLL of 4 GSM8K items (batch 4, 64 new tokens), packed
  layers dequantized per call (`--dequant-cache off`).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.synthetic_llama import byte_tokenizer

GiB = 1024**3


class Peak:
    """torch.cuda.max_memory_allocated over a phase, less what was allocated when it began."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self.start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t = time.time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.time() - self.t
        if self.device.type == "cuda" and exc[0] is None:
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start


def row(phase: str, peak: Peak, planned: int | None, note: str) -> dict:
    measured = None if peak.bytes is None else peak.bytes / GiB
    out = {"phase": phase, "measured_gib": measured, "seconds": peak.seconds, "note": note}
    out["planned_gib"] = None if planned is None else planned / GiB
    if measured is not None and planned:
        out["measured_over_planned"] = peak.bytes / planned
    print(f"  scale {out}", flush=True)
    return out


def run_scale(smoke: bool, device: torch.device) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from qdiablo.memory.shapes import preset_config

    torch.manual_seed(0)
    config = (
        LlamaConfig(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=259,
            tie_word_embeddings=False,
        )
        if smoke
        else preset_config("tinyllama-1.1b")
    )
    config.vocab_size = max(config.vocab_size, 259)  # the byte tokenizer's ids must fit
    sizes = dict(
        group=64 if smoke else 128,
        windows=2 if smoke else 8,
        window=32 if smoke else 512,
        seq=256 if smoke else 2048,
        new=8 if smoke else 64,
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        rows = [quantize_phase(model, work, device, sizes)]
        del model
        rows += train_phases(work, device, sizes)
        rows.append(eval_phase(work, device, sizes))
    return {"model": "tiny (smoke)" if smoke else "TinyLlama-1.1B shape, random", "rows": rows}


def planner(folder: Path, device: torch.device, **settings):
    from qdiablo.memory.plan import MemoryPlan
    from qdiablo.memory.settings import PlanSettings
    from qdiablo.memory.shapes import load_source

    return MemoryPlan(load_source(str(folder)), PlanSettings(device=device.type, **settings))


def quantize_phase(model, work: Path, device: torch.device, sizes: dict) -> dict:
    from quantizers import QuantConfig, quantize_model, save_quantized

    tokenizer = byte_tokenizer()
    calib = [torch.randint(3, 259, (1, sizes["window"])) for _ in range(sizes["windows"])]
    config = QuantConfig(method="gptq", bits=4, group_size=sizes["group"])
    with Peak(device) as peak:
        quantize_model(model, calib, config, device=device, calib_dtype=torch.bfloat16)
    save_quantized(model, work / "q", tokenizer)
    plan = planner(
        work / "q",
        device,
        calib_samples=sizes["windows"],
        calib_seq_len=sizes["window"],
    )
    return row("quantize", peak, plan.quantize().device, f"GPTQ W4 g{sizes['group']}")


def long_records(work: Path) -> Path:
    path = work / "records.jsonl"
    text = "A farmer has 17 sheep and buys 25 more, then sells a third of them. " * 40
    rows = [
        {"instruction": f"Question {i}: what is left?", "input": "", "output": text, "answer": "28"}
        for i in range(16)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_phases(work: Path, device: torch.device, sizes: dict) -> list[dict]:
    from qdiablo.train.config import TrainConfig
    from qdiablo.train.run import train

    common = dict(
        model=str(work / "q"),
        base="gptq",
        data=[str(long_records(work))],
        decontaminate=["none"],
        max_length=sizes["seq"],
        save_steps=0,
        progress=False,
        device=str(device),
    )
    plan = planner(work / "q", device, seq_len=sizes["seq"])
    rows = []
    with Peak(device) as peak:
        train(TrainConfig(**common, max_steps=2, batch_size=1, output=str(work / "t1")))
    rows.append(row("train 1×seq", peak, plan.train(1).device, f"{sizes['seq']} tokens"))
    with Peak(device) as peak:
        result = train(TrainConfig(**common, max_steps=1, batch_size=8, output=str(work / "t8")))
    micro = result.results["micro_batch_size"]
    planned = plan.train(micro).device if device.type == "cuda" else None
    note = f"micro-batch {micro} picked by the planner ({result.results['runtime']})"
    rows.append(row("train, planner's micro-batch", peak, planned, note))
    return rows


def eval_phase(work: Path, device: torch.device, sizes: dict) -> dict:
    from eval.math10k import resolve_tasks
    from eval.runner import EvalSettings, evaluate
    from qdiablo.models import load_base, load_tokenizer

    tokenizer = load_tokenizer(str(work / "q"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_base(str(work / "q"), device=device, dtype=dtype)
    tasks = resolve_tasks(["gsm8k"])
    settings = EvalSettings(
        limit=4,
        batch_size=4,
        max_new_tokens=sizes["new"],
        template="alpaca",
        dequant_cache=False,
    )
    with Peak(device) as peak:
        evaluate(model, tokenizer, tasks, work / "eval", settings, progress=False)
    longest = max(len(tokenizer(r.instruction)["input_ids"]) for r in tasks[0].records[:4])
    plan = planner(
        work / "q",
        device,
        eval_batch=4,
        eval_prompt=longest + 64,  # the alpaca template's own tokens
        eval_new_tokens=sizes["new"],
        eval_reference=300,
    )
    planned = plan.eval().device
    if planned is not None:
        planned -= plan.state.base  # the model was loaded before the phase began
    return row("eval (dequant cache off)", peak, planned, "4 GSM8K items, batch 4")
