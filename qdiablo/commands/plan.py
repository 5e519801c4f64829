"""`qdiablo plan`: predicted host and device memory of quantize, train, eval and export for a model
and a setup, from its config.json alone (built on the meta device: nothing is downloaded but the
config, nothing is allocated), and the largest micro-batch that fits a device.

    qdiablo plan --model meta-llama/Llama-2-7b-hf --bits 2 --memory-gib 24
    qdiablo plan --model llama-2-70b --bits 2 --group-size 64 --memory-gib 48
    qdiablo plan --model runs/smollm2-w2 --device cpu          # a quantize folder: its bits
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from qdiablo.adapters.registry import get_adapter
from qdiablo.flags import add_dataclass_arguments

HELP = "predict each verb's host and device memory for a model (config.json only) and a setup"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qdiablo.memory.settings import PlanSettings

    presets = "llama-2-7b, llama-2-13b, llama-2-70b, llama-3.1-8b, llama-3.1-70b, ..."

    p.add_argument(
        "--model",
        required=True,
        help="a folder holding config.json (nothing else is read), a hub id (only config.json is "
        f"fetched), smollm2, or a preset: {presets}",
    )
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model's folder")
    add_dataclass_arguments(p, PlanSettings, group="setup")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    from qdiablo.memory.plan import MemoryPlan
    from qdiablo.memory.settings import PlanSettings
    from qdiablo.memory.shapes import load_source

    settings = PlanSettings(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(PlanSettings)}
    )
    plan = MemoryPlan(load_source(args.model, args.gguf_file), settings)
    memory = _device_memory(settings)
    report = plan_report(plan, memory)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(render(report))
    return 0


def _device_memory(settings) -> int | None:
    """--memory-gib, else this machine's GPU (when planning for one), else None."""
    from qdiablo.memory.plan import GiB

    if settings.memory_gib is not None:
        return int(settings.memory_gib * GiB)
    if settings.device == "cuda":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory
    return None


def plan_report(plan, memory: int | None) -> dict:
    """The plan as a dict: settings, model, state, each verb's peaks, the micro-batch that fits
    and, when the asked setup does not fit, the nearest ones that do."""
    from qdiablo.memory.plan import GiB, usable

    s, shape = plan.settings, plan.shape
    report = {
        "model": shape.name,
        "shape": dataclasses.asdict(shape),
        "settings": dataclasses.asdict(s),
        "bits": plan.bits,
        "group_size": plan.group,
        "state_gib": {
            "packed": plan.state.packed / GiB,
            "other": (plan.state.other + plan.state.buffers) / GiB,
            "adapter": plan.state.adapter / GiB,
            "grads": plan.state.grads / GiB,
            "adamw": plan.state.adamw / GiB,
        },
        "peaks_gib": [
            {
                "verb": p.verb,
                "host": p.host / GiB,
                "device": None if p.device is None else p.device / GiB,
                "note": p.note,
            }
            for p in plan.peaks()
        ],
    }
    if memory is not None:
        report["device_memory_gib"] = memory / GiB
        report["usable_gib"] = usable(memory) / GiB
        report["largest_micro_batch"] = plan.largest_micro_batch(memory)
        if report["largest_micro_batch"] == 0:
            report["fits_instead"] = what_fits(plan, memory)
    return report


def what_fits(plan, memory: int) -> list[dict]:
    """Shorter sequences (and, for DiaBlo, larger N: fewer trainable parameters) that fit at
    micro-batch 1 when the asked setup does not, nearest first."""
    from qdiablo.memory.plan import MemoryPlan

    s = plan.settings
    found = []
    seqs = [t for t in (s.seq_len, 1536, 1024, 768, 512, 256) if t <= s.seq_len]
    larger = get_adapter(s.adapter).setting == "num_blocks"  # a larger N: fewer parameters
    blocks = [s.num_blocks] + [n for n in (128, 256) if n > s.num_blocks and larger]
    for n in blocks:
        other = (
            plan
            if n == s.num_blocks
            else MemoryPlan(plan.source, dataclasses.replace(s, num_blocks=n))
        )
        for t in seqs:
            if other.largest_micro_batch(memory, t) >= 1:
                found.append({"num_blocks": n, "seq_len": t})
                break
    return found


def render(report: dict) -> str:
    s, shape = report["settings"], report["shape"]
    bits = "float base" if report["bits"] is None else f"W{report['bits']} g{report['group_size']}"
    method = get_adapter(s["adapter"])
    adapter = f"{method.title} {method.describe(s['num_blocks'], s['rank'])}"
    lines = [
        f"{report['model']}: {shape['layers']} layers, hidden {shape['hidden']}, "
        f"intermediate {shape['intermediate']}, {shape['heads']}/{shape['kv_heads']} heads, "
        f"vocab {shape['vocab']}",
        f"setup: {bits}, {adapter}, {s['precision']} compute, {s['dtype']} float weights, "
        f"checkpointing {'on' if s['checkpointing'] else 'off'}, {s['processes']} process(es), "
        f"on {s['device']}",
        "state (GiB per process): "
        + ", ".join(f"{k} {v:.2f}" for k, v in report["state_gib"].items()),
        "",
        "| verb | host peak GiB | GPU peak GiB | what it holds |",
        "|---|---|---|---|",
    ]
    for p in report["peaks_gib"]:
        device = "-" if p["device"] is None else f"{p['device']:.2f}"
        lines.append(f"| {p['verb']} | {p['host']:.2f} | {device} | {p['note']} |")
    if "largest_micro_batch" in report:
        b = report["largest_micro_batch"]
        lines.append("")
        lines.append(
            f"on {report['device_memory_gib']:.0f} GiB ({report['usable_gib']:.1f} usable): "
            + (
                f"the largest micro-batch is {b} × {s['seq_len']} tokens"
                + ("" if b >= s["micro_batch"] else f" (not {s['micro_batch']}: accumulate)")
                if b
                else f"training does not fit at 1 × {s['seq_len']} tokens"
            )
        )
        for alt in report.get("fits_instead", []):
            lines.append(f"  fits instead: N={alt['num_blocks']}, {alt['seq_len']} tokens")
        state = sum(report["state_gib"].values())
        if not b and state > report["usable_gib"]:
            lines.append(
                f"  why: the model state alone (base, adapter, gradients, AdamW) is {state:.1f} "
                "GiB; shard it over more GPUs (FSDP2, --processes) or use fewer bits"
            )
    return "\n".join(lines)
