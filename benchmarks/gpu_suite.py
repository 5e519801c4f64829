"""Issue 7's GPU benchmark in one command: training steps, decode GEMV bandwidth, kernel timings,
the DiaBlo branch and MagR+GPTQ time, on a LLaMA-2-7B-shaped model with random weights.

    python benchmarks/gpu_suite.py --budget 480         # everything it can in 8 min, one GPU
    python benchmarks/gpu_suite.py --only decode kernels
    python benchmarks/gpu_suite.py --smoke              # tiny shapes, CPU allowed: does it run?

Sections run in this priority order, each in its own process (so its time counts Triton's JIT
compiles), each writing its JSON to --out-dir as soon as it is done: with --budget SECONDS a
section still running when the budget is spent is killed and recorded as such, and the finished
ones are kept. A section whose dependency is missing (bitsandbytes for QLoRA) records why it
skipped. Install on a GPU box with `pip install --no-deps -e .` (its own torch and triton).
- correctness: the CUDA tests of tests/test_kernels.py (bf16 included) against the torch path.
- kernels, train, memory (2-bit DiaBlo against QLoRA), decode, quant, diablo: below.

Sections (speed and memory need no trained weights, so every weight is random):
- train:   forward + backward + AdamW step, gradient checkpointing on, bf16 autocast, at batch
           4×512 and 1×128, for MagR-DiaBlo on a packed 4-bit and 2-bit base (N=64; the packed
           codes are random: MagR changes values, not speed), QLoRA (bitsandbytes NF4 + double
           quant + PEFT LoRA) at the matched rank and r=64, GPTQ-LoRA (packed 4-bit QuantLinear +
           PEFT LoRA at the matched rank), bf16 LoRA (matched) and bf16 DiaBlo. Targets
           q,k,v,up,down. The model has `--layers` decoder blocks (default 4), NOT 32: the step
           time of the adapted blocks scales with the count, the embedding and head do not.
           Each method runs in its own subprocess (clean peak memory), methods interleaved
           when --repeats > 1; the median is reported. Peak = torch.cuda.max_memory_allocated.
- decode:  the packed GEMV at batch 1 (4- and 2-bit, g128), timed by CUDA-graph replay; achieved
           bandwidth = bytes of packed weights + zeros + scales + g_idx read / time, as a
           fraction of the device's copy bandwidth (a 1 GiB tensor's .copy_: read + write).
- kernels: QuantLinear forward and forward+backward, Triton against the torch path
           (dequantize, then cuBLAS) at M = 2048, 128, 16, 1: evidence for the `auto` rule.
- diablo:  the DiaBlo branch x·blockdiag(B), forward + backward, at 4096→4096 and 4096→11008,
           N=64: strided bmm (what qdiablo/diablo/layer.py does), einsum with its reshapes.
           The fastest should be kept; layer.py is only changed on this evidence.
- quant:   benchmarks/quantizers_llama7b_block.py --device cuda: MagR+GPTQ stages for one
           7B-shaped block, extrapolated ×32, against the 3.5-minute target.
- scale:   benchmarks/gpu_scale.py (issue 19): a 1.1B (TinyLlama's shape) through quantize,
           train (1 × 2048, and the planner's micro-batch) and eval on the GPU, each phase's
           torch.cuda.max_memory_allocated beside the memory planner's prediction.

Writes --out (JSON) and prints a markdown report with the device name and the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
SECTIONS = ("correctness", "kernels", "train", "memory", "decode", "quant", "diablo", "scale")
MEMORY_METHODS = ("diablo-packed-2bit", "qlora-matched")  # the `memory` section's methods
# name: (base, adapter, rank setting)
METHODS = {
    "diablo-packed-4bit": ("packed4", "diablo", None),
    "diablo-packed-2bit": ("packed2", "diablo", None),
    "qlora-matched": ("nf4", "lora", "matched"),
    "qlora-r64": ("nf4", "lora", 64),
    "gptq-lora-4bit": ("packed4", "lora", "matched"),
    "lora-bf16": ("bf16", "lora", "matched"),
    "diablo-bf16": ("bf16", "diablo", None),
}
REFERENCE = "qlora-matched"


def llama_config(smoke: bool, layers: int):
    from transformers import LlamaConfig

    if smoke:  # N=64 needs in/out divisible by 64
        return LlamaConfig(
            hidden_size=256,
            intermediate_size=512,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_hidden_layers=2,
            vocab_size=512,
        )
    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=layers,
        vocab_size=32000,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn, device: torch.device, iters: int, warmup: int = 2) -> float:
    """Median seconds per call of fn (synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def graph_bench(fn, device: torch.device, iters: int) -> float:
    """Seconds per call with launch overhead removed: `iters` calls captured in one CUDA graph,
    replayed. Falls back to `bench` off CUDA or if capture fails."""
    if device.type != "cuda":
        return bench(fn, device, iters)
    try:
        fn()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm up on the side stream, as capture requires
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
        graph.replay()
        return bench(graph.replay, device, 5, warmup=1) / iters
    except Exception as e:  # capture is an optimisation: report what failed, time eagerly
        print(f"  (CUDA graph capture failed: {type(e).__name__}: {e}; timing eagerly)")
        return bench(fn, device, iters)


# --------------------------------------------------------------------------------------------
# packed layers with random codes
# --------------------------------------------------------------------------------------------


def random_quant_linear(
    in_features: int, out_features: int, bits: int, group_size: int, device, seed: int = 0
):
    """A QuantLinear with uniformly random codes and zeros and small scales (speed does not
    depend on the values; real MagR+GPTQ codes run the same kernels)."""
    from quantizers import QuantLinear

    layer = QuantLinear(in_features, out_features, bits, group_size, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    packed = layer.packed_tensors()
    for buf in (packed.qweight, packed.qzeros):
        buf.copy_(torch.randint(-(2**31), 2**31 - 1, buf.shape, generator=g, device=device))
    packed.scales.copy_(torch.rand(packed.scales.shape, generator=g, device=device) * 0.01 + 1e-3)
    return layer


def pack_linears_(model: nn.Module, bits: int, group_size: int) -> int:
    """Replace every nn.Linear but the output head with a random packed QuantLinear, in place."""
    head = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    for i, name in enumerate(names):
        old = model.get_submodule(name)
        new = random_quant_linear(
            old.in_features, old.out_features, bits, group_size, old.weight.device, seed=i
        )
        model.set_submodule(name, new)
        del old
    return len(names)


# --------------------------------------------------------------------------------------------
# train: one method per subprocess
# --------------------------------------------------------------------------------------------


def build_model(method: str, smoke: bool, layers: int, device: torch.device):
    """The adapted model for a method, and its trainable-parameter count."""
    from transformers import LlamaForCausalLM

    from qdiablo.adapters.budget import matched_rank
    from qdiablo.adapters.common import adapted_layers, layer_shapes, trainable_parameters
    from qdiablo.adapters.diablo import attach_diablo
    from qdiablo.adapters.lora import attach_lora
    from qdiablo.nf4 import bnb_nf4_config, quantize_bnb_4bit_

    base, adapter, rank = METHODS[method]
    torch.manual_seed(0)
    config = llama_config(smoke, layers)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config.use_cache = False
    shapes = layer_shapes(adapted_layers(model, TARGETS))
    if base.startswith("packed"):
        pack_linears_(model, int(base[-1]), 128 if not smoke else 64)
    elif base == "nf4":
        quantize_bnb_4bit_(model, bnb_nf4_config(torch.bfloat16))
    for p in model.parameters():
        p.requires_grad_(False)
    if adapter == "diablo":
        model = attach_diablo(model, 64, TARGETS, dropout=0.05)
        setting = "N=64"
    else:
        r = matched_rank(shapes, 64) if rank == "matched" else rank
        model = attach_lora(model, r, 2.0 * r, TARGETS, dropout=0.05)
        setting = f"r={r}"
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    return model, trainable_parameters(model), setting


def train_worker(spec: dict) -> dict:
    """Build one method's model, time training steps at each shape, return the figures."""
    device = torch.device(spec["device"])
    model, trainable, setting = build_model(spec["method"], spec["smoke"], spec["layers"], device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    out = {"method": spec["method"], "setting": setting, "trainable": trainable, "shapes": {}}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    for batch, seq in spec["shapes"]:
        ids = torch.randint(0, vocab, (batch, seq), device=device)

        def step(ids=ids):
            with autocast:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(spec["warmup"]):
            step()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        for _ in range(spec["steps"]):
            step()
        sync(device)
        elapsed = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        out["shapes"][f"{batch}x{seq}"] = {
            "tokens_per_s": batch * seq * spec["steps"] / elapsed,
            "step_ms": elapsed / spec["steps"] * 1e3,
            "peak_mb": peak / 2**20 if peak is not None else None,
        }
    return out


def missing_dependency(method: str) -> str | None:
    """Why a method cannot run here (bitsandbytes absent for the NF4 bases), else None."""
    if METHODS[method][0] != "nf4":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:
        return f"bitsandbytes is not importable ({type(e).__name__}: {e})"
    return None


def run_train(args, device: torch.device, methods: list[str]) -> dict:
    shapes = [(2, 64), (1, 32)] if args.smoke else [(4, 512), (1, 128)]
    skipped = {m: why for m in methods if (why := missing_dependency(m))}
    methods = [m for m in methods if m not in skipped]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for repeat in range(args.repeats):
        order = methods[repeat % len(methods) :] + methods[: repeat % len(methods)]
        for method in order:
            spec = {
                "method": method,
                "device": str(device),
                "smoke": args.smoke,
                "layers": args.layers,
                "shapes": shapes,
                "steps": 2 if args.smoke else args.steps,
                "warmup": 1 if args.smoke else 2,
            }
            cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            }
            t = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"  {method}: FAILED\n{proc.stderr[-3000:]}", flush=True)
                runs[method].append({"error": proc.stderr[-3000:]})
                continue
            result = json.loads(lines[-1][len("RESULT ") :])
            runs[method].append(result)
            figures = "  ".join(
                f"{k}: {v['tokens_per_s']:.0f} tok/s"
                + (f", {v['peak_mb']:.0f} MB" if v["peak_mb"] is not None else "")
                for k, v in result["shapes"].items()
            )
            took = time.time() - t
            print(f"  [{repeat + 1}] {method:20s} {result['setting']:6s} {figures} ({took:.0f} s)")
    summary = summarize_train(runs, shapes)
    summary.update({m: {"skipped": why} for m, why in skipped.items()})
    return summary


def summarize_train(runs: dict[str, list[dict]], shapes) -> dict:
    rows = {}
    for method, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            rows[method] = {"error": results[0]["error"] if results else "not run"}
            continue
        row = {"setting": ok[0]["setting"], "trainable": ok[0]["trainable"], "shapes": {}}
        for b, s in shapes:
            key = f"{b}x{s}"
            tps = statistics.median(r["shapes"][key]["tokens_per_s"] for r in ok)
            peaks = [r["shapes"][key]["peak_mb"] for r in ok if r["shapes"][key]["peak_mb"]]
            row["shapes"][key] = {
                "tokens_per_s": tps,
                "peak_mb": max(peaks) if peaks else None,
            }
        rows[method] = row
    ref = rows.get(REFERENCE, {})
    for row in rows.values():
        for key, fig in row.get("shapes", {}).items():
            r = ref.get("shapes", {}).get(key) if "shapes" in ref else None
            if r:
                # time ratio = inverse of the throughput ratio: the targets are in time
                fig["time_vs_qlora"] = r["tokens_per_s"] / fig["tokens_per_s"]
                if fig["peak_mb"] and r["peak_mb"]:
                    fig["memory_vs_qlora"] = fig["peak_mb"] / r["peak_mb"]
    return rows


# --------------------------------------------------------------------------------------------
# decode, kernels, diablo
# --------------------------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, smoke: bool) -> float:
    """Bytes/s of a large device-to-device copy (each byte read once and written once)."""
    n = (16 if smoke else 1024) * 2**20
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t = graph_bench(lambda: b.copy_(a), device, 5 if smoke else 20)
    return 2 * n / t


def run_decode(args, device: torch.device) -> dict:
    from quantizers import kernels
    from quantizers.kernels.backends import get_backend

    bw = copy_bandwidth(device, args.smoke)
    shapes = [(256, 256)] if args.smoke else [(4096, 4096), (11008, 4096), (4096, 11008)]
    rows = []
    for bits in (4, 2):
        for out_f, in_f in shapes:
            layer = random_quant_linear(in_f, out_f, bits, 128 if not args.smoke else 64, device)
            x = torch.randn(
                1,
                in_f,
                device=device,
                dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
            )
            nbytes = sum(b.numel() * b.element_size() for b in layer.packed_tensors())
            group = layer.contiguous_group_size()
            backend = kernels.select(x, bits)
            if backend != kernels.TORCH:  # the backend's own forward, without the layer
                bufs = (*layer.packed_tensors(), bits, None, group)
                fn = partial(get_backend(backend).forward, x, *bufs)
            else:
                fn = partial(layer, x)
            with torch.no_grad():
                t = graph_bench(fn, device, 10 if args.smoke else 200)
                eager = bench(fn, device, 5 if args.smoke else 50)
            rows.append(
                {
                    "bits": bits,
                    "shape": f"{out_f}x{in_f}",
                    "backend": backend,
                    "us": t * 1e6,
                    "eager_us": eager * 1e6,
                    "bytes": nbytes,
                    "gb_per_s": nbytes / t / 1e9,
                    "fraction_of_copy": nbytes / t / bw,
                }
            )
            r = rows[-1]
            print(
                f"  decode {bits}-bit {r['shape']} [{backend}]: {r['us']:.1f} us, "
                f"{r['gb_per_s']:.0f} GB/s = {r['fraction_of_copy']:.0%} of copy",
                flush=True,
            )
    return {"copy_gb_per_s": bw / 1e9, "rows": rows}


def run_kernels(args, device: torch.device) -> dict:
    """QuantLinear forward and forward+backward: Triton against the torch path."""
    from quantizers import kernels
    from quantizers.kernels.backends import all_backends

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [(256, 256)] if args.smoke else [(4096, 4096), (11008, 4096), (4096, 11008)]
    ms = [17, 1] if args.smoke else [2048, 128, 16, 1]
    n = 3 if args.smoke else 20
    bit_widths = (4,) if args.smoke else (4, 2, 3)
    registered = [b.name for b in all_backends()]  # triton, and any other registered backend
    backends = ["torch", *registered] if device.type == "cuda" else ["torch"]
    rows = []
    for bits in bit_widths:
        for out_f, in_f in shapes:
            layer = random_quant_linear(in_f, out_f, bits, 128 if not args.smoke else 64, device)
            for m in ms:
                x = torch.randn(m, in_f, device=device, dtype=dtype, requires_grad=True)
                dy = torch.randn(m, out_f, device=device, dtype=dtype)
                row = {"bits": bits, "shape": f"{out_f}x{in_f}", "m": m}
                for backend in backends:
                    kernels.set_kernel(backend)
                    try:
                        with torch.no_grad():
                            row[f"{backend}_fwd_us"] = bench(partial(layer, x), device, n) * 1e6
                        fwdbwd = partial(_fwd_bwd, layer, x, dy)
                        row[f"{backend}_fwdbwd_us"] = bench(fwdbwd, device, n) * 1e6
                    except Exception as e:
                        row[f"{backend}_error"] = f"{type(e).__name__}: {e}"
                    finally:
                        kernels.set_kernel(None)
                if "triton_fwd_us" in row and "torch_fwd_us" in row:
                    row["speedup_fwd"] = row["torch_fwd_us"] / row["triton_fwd_us"]
                    row["speedup_fwdbwd"] = row["torch_fwdbwd_us"] / row["triton_fwdbwd_us"]
                rows.append(row)
                print(f"  kernels {row}", flush=True)
    return {"dtype": str(dtype), "rows": rows}


def _fwd_bwd(fn, x: torch.Tensor, dy: torch.Tensor) -> None:
    fn(x).backward(dy)


def diablo_bmm(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    from qdiablo.diablo.layer import block_diagonal_matmul

    return block_diagonal_matmul(x, blocks, blocks.shape[0] * blocks.shape[2])


def diablo_einsum(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    n, bi, bo = blocks.shape
    lead = x.shape[:-1]
    y = torch.einsum("tni,nio->tno", x.reshape(-1, n, bi), blocks.to(x.dtype))
    return y.reshape(*lead, n * bo)


def run_diablo(args, device: torch.device) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [(256, 256)] if args.smoke else [(4096, 4096), (4096, 11008), (11008, 4096)]
    tokens = [64] if args.smoke else [2048, 128]
    n = 3 if args.smoke else 30
    rows = []
    for in_f, out_f in shapes:
        for t in tokens:
            blocks = torch.zeros(64, in_f // 64, out_f // 64, device=device, requires_grad=True)
            x = torch.randn(t, in_f, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn(t, out_f, device=device, dtype=dtype)
            row = {"shape": f"{in_f}->{out_f}", "tokens": t}
            for name, fn in (("bmm", diablo_bmm), ("einsum", diablo_einsum)):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    row[f"{name}_fwdbwd_us"] = (
                        bench(partial(_fwd_bwd, partial(fn, blocks=blocks), x, dy), device, n) * 1e6
                    )
            row["fastest"] = min(("bmm", "einsum"), key=lambda k: row[f"{k}_fwdbwd_us"])
            rows.append(row)
            print(f"  diablo {row}", flush=True)
    return {
        "rows": rows,
        "note": "layer.py uses the strided bmm; switch only if einsum (or a fused kernel) wins "
        "at the training shapes on the GPU. No fused Triton DiaBlo kernel is benchmarked yet.",
    }


def run_quant(args, device: torch.device) -> dict:
    out = REPO / "runs" / "gpu-suite-quant.json"
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "quantizers_llama7b_block.py"),
        "--device",
        str(device),
        "--out",
        str(out),
    ]
    cmd += (
        ["--tokens", "1024", "--magr-iters", "1"]
        if args.smoke
        else ["--tokens", "32768", "--magr-iters", "10"]
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    report = json.loads(out.read_text())
    whole = report["whole_model_min (extrapolated, x32 blocks)"]
    ours = sum(v for k, v in whole.items() if "paper" not in k and "coordinate" not in k)
    report["magr_gptq_7b_min (calibration + qdiablo MagR + GPTQ, x32)"] = ours
    report["target_min"] = 3.5
    return report


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def run_scale(args, device: torch.device) -> dict:
    from benchmarks.gpu_scale import run_scale as scale

    return scale(args.smoke, device)


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _head(*cells) -> list[str]:
    return [_row(*cells), _row(*["---"] * len(cells))]


def _f(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown(results: dict) -> str:
    lines = [f"## GPU suite: {results['device']}, {results['date']}", ""]
    for section in SECTIONS:
        r = results.get(section)
        if isinstance(r, dict) and ("skipped" in r or "timeout" in r or "error" in r):
            why = r.get("skipped") or r.get("timeout") or r["error"][-800:]
            lines += [f"Section `{section}`: {why}", ""]
            results = {k: v for k, v in results.items() if k != section}
    if "correctness" in results:
        c = results["correctness"]
        lines += [f"Kernel correctness ({c['command']}): {c['summary']}", ""]
    for section in ("train", "memory"):
        if section not in results:
            continue
        lines += [f"Training step, `{section}` ({results['train_note']})", ""]
        lines += _head(
            "method", "adapter", "trainable", "shape", "tokens/s", "time × QLoRA-matched",
            "peak MB", "memory × QLoRA-matched",
        )  # fmt: skip
        for method, row in results[section].items():
            if not isinstance(row, dict):  # "seconds"
                continue
            if "error" in row or "skipped" in row:
                why = "failed" if "error" in row else f"skipped: {row['skipped']}"
                lines.append(_row(method, why, "", "", "", "", "", ""))
                continue
            for key, fig in row["shapes"].items():
                lines.append(
                    _row(
                        method,
                        row["setting"],
                        f"{row['trainable']:,}",
                        key,
                        f"{fig['tokens_per_s']:.0f}",
                        _f(fig.get("time_vs_qlora"), ".2f"),
                        _f(fig["peak_mb"], ".0f"),
                        _f(fig.get("memory_vs_qlora"), ".2f"),
                    )
                )
        lines += [
            "",
            "Targets: 4-bit time ≤ 0.9× at 4x512 and ≤ 0.7× at 1x128, memory ≤ 1×; "
            "2-bit memory < 0.7×.",
            "",
        ]
    if "decode" in results:
        d = results["decode"]
        lines += [
            f"Decode GEMV, batch 1 (copy bandwidth {d['copy_gb_per_s']:.0f} GB/s; target ≥ 70%)",
            "",
        ]
        lines += _head("bits", "out×in", "backend", "µs (graph)", "µs (eager)", "GB/s", "of copy")
        for r in d["rows"]:
            lines.append(
                _row(
                    r["bits"],
                    r["shape"],
                    r["backend"],
                    f"{r['us']:.1f}",
                    f"{r['eager_us']:.1f}",
                    f"{r['gb_per_s']:.0f}",
                    f"{r['fraction_of_copy']:.0%}",
                )
            )
        lines.append("")
    if "kernels" in results:
        lines += ["QuantLinear, Triton vs torch path (µs, fwd / fwd+bwd)", ""]
        lines += _head("bits", "out×in", "M", "torch", "triton", "speed-up fwd", "fwd+bwd")
        for r in results["kernels"]["rows"]:
            torch_us = f"{r['torch_fwd_us']:.0f} / {r['torch_fwdbwd_us']:.0f}"
            triton_us = (
                f"{r['triton_fwd_us']:.0f} / {r['triton_fwdbwd_us']:.0f}"
                if "triton_fwdbwd_us" in r
                else r.get("triton_error", "—")
            )
            lines.append(
                _row(
                    r["bits"],
                    r["shape"],
                    r["m"],
                    torch_us,
                    triton_us,
                    _f(r.get("speedup_fwd"), ".2f"),
                    _f(r.get("speedup_fwdbwd"), ".2f"),
                )
            )
        lines.append("")
    if "diablo" in results:
        lines += ["DiaBlo branch, N=64, fwd+bwd (µs)", ""]
        lines += _head("in→out", "tokens", "bmm (layer.py)", "einsum", "fastest")
        for r in results["diablo"]["rows"]:
            lines.append(
                _row(
                    r["shape"],
                    r["tokens"],
                    f"{r['bmm_fwdbwd_us']:.0f}",
                    f"{r['einsum_fwdbwd_us']:.0f}",
                    r["fastest"],
                )
            )
        lines += ["", results["diablo"]["note"], ""]
    if "quant" in results:
        q = results["quant"]
        if "error" in q:
            lines.append(f"Quantization: failed\n```\n{q['error'][-1500:]}\n```")
        else:
            lines += ["Quantization, one 7B-shaped block extrapolated ×32 (minutes):", ""]
            for k, v in q["whole_model_min (extrapolated, x32 blocks)"].items():
                lines.append(f"- {k}: {v:.2f}")
            total = q["magr_gptq_7b_min (calibration + qdiablo MagR + GPTQ, x32)"]
            lines.append(f"- MagR+GPTQ total: {total:.2f} (target ≤ 3.5)")
    if "scale" in results:
        lines += ["", f"Scale ({results['scale']['model']}): device peak against the planner", ""]
        lines += _head("phase", "measured GiB", "planned GiB", "measured / planned", "s", "note")
        for r in results["scale"]["rows"]:
            lines.append(
                _row(
                    r["phase"],
                    _f(r["measured_gib"], ".2f"),
                    _f(r["planned_gib"], ".2f"),
                    _f(r.get("measured_over_planned"), ".2f"),
                    f"{r['seconds']:.0f}",
                    r["note"],
                )
            )
    return "\n".join(lines)


def run_correctness(args, device: torch.device) -> dict:
    """The CUDA tests of tests/test_kernels.py (every bit width, dtype incl. bf16, act-order)
    in a child pytest; with --smoke on CPU, its quick dispatch tests."""
    select = "gpu" if device.type == "cuda" else "group_size or mode_from"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", select]
    cmd.append(str(REPO / "tests" / "test_kernels.py"))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_child_env())
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    out = {"command": f"pytest tests/test_kernels.py -k '{select}'", "summary": tail}
    out["passed"] = proc.returncode == 0
    if proc.returncode != 0:
        out["output"] = proc.stdout[-4000:] + proc.stderr[-2000:]
    return out


def _child_env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }


def run_section(section: str, args, device: torch.device) -> dict:
    if section in ("train", "memory"):
        wanted = MEMORY_METHODS if section == "memory" else args.methods
        methods = [m for m in args.methods if m in wanted]
        if section == "train" and "memory" in args.only:
            methods = [m for m in methods if m not in MEMORY_METHODS or m == REFERENCE]
        return run_train(args, device, methods)
    runner = {
        "correctness": run_correctness,
        "kernels": run_kernels,
        "decode": run_decode,
        "diablo": run_diablo,
        "quant": run_quant,
        "scale": run_scale,
    }[section]
    return runner(args, device)


def _write_json(path: Path, data: dict) -> None:
    """Atomically: a reader (or a killed run) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def section_child(args, device: torch.device) -> None:
    """Run one section in this process and write its JSON (the parent times and kills us)."""
    t = time.time()
    result = run_section(args.section, args, device)
    result["seconds"] = time.time() - t  # includes Triton's JIT compiles in this process
    _write_json(args.section_out, result)


def run_sections(args, results: dict) -> None:
    """Each section in a child process, in priority order, within --budget seconds."""
    start = time.time()
    deadline = start + (args.budget or float("inf"))
    for section in [s for s in SECTIONS if s in args.only]:
        path = args.out_dir / f"{section}.json"
        left = deadline - time.time()
        print(f"== {section} ({left:.0f} s of budget left)" if args.budget else f"== {section}")
        if left < 1:
            results[section] = {"skipped": f"the budget of {args.budget:.0f} s was spent"}
            _write_json(path, results[section])
            continue
        cmd = [sys.executable, __file__, *sys.argv[1:], "--section", section]
        cmd += ["--section-out", str(path)]
        path.unlink(missing_ok=True)
        t = time.time()
        proc = subprocess.Popen(cmd, env=_child_env(), start_new_session=True)
        try:
            proc.wait(timeout=None if left == float("inf") else left)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the section and the workers it started
            proc.wait()
        took = time.time() - t
        finished = path.exists()
        if finished:
            results[section] = json.loads(path.read_text())
        elif proc.returncode not in (0, None) and took < left:
            results[section] = {"error": f"the section process exited with {proc.returncode}"}
        else:
            results[section] = {
                "timeout": f"killed after {took:.0f} s: the budget of {args.budget:.0f} s was spent"
            }
        if not finished:
            _write_json(path, results[section])
        print(f"   ({took:.0f} s)", flush=True)
        _write_json(args.out, results)
    results["wall_s"] = time.time() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    p.add_argument("--section-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--layers", type=int, default=4, help="decoder blocks in the training model")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per shape")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats of the methods")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU too")
    p.add_argument("--budget", type=float, help="seconds for all sections, JIT compiles included")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-suite.json")
    p.add_argument("--out-dir", type=Path, help="per-section JSONs (default: beside --out)")
    args = p.parse_args()
    args.out_dir = args.out_dir or args.out.with_name(args.out.stem + "-sections")
    if args.worker:
        print("RESULT " + json.dumps(train_worker(json.loads(args.worker))), flush=True)
        return
    if torch.cuda.is_available():
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(device)
    elif args.smoke:
        device, name = torch.device("cpu"), f"CPU ({platform.machine()}), smoke shapes"
    else:
        raise SystemExit(
            "gpu_suite: no CUDA device. Run it on a GPU (the figures of issue 7 need one), "
            "or pass --smoke to check on CPU that it runs."
        )
    if args.section:
        section_child(args, device)
        return
    if args.smoke and device.type == "cpu":
        args.only = [s for s in args.only if s != "quant"]  # the 7B block is minutes on CPU
    model = "smoke model" if args.smoke else f"LLaMA-2-7B shapes, {args.layers} of 32 blocks"
    results: dict = {
        "device": name,
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "torch": torch.__version__,
        "smoke": args.smoke,
        "budget_s": args.budget,
        "train_note": (
            f"{model}, random weights, bf16 autocast, gradient checkpointing, AdamW, "
            f"{args.steps} timed steps, median of {args.repeats} interleaved run(s)"
        ),
    }
    run_sections(args, results)
    _write_json(args.out, results)
    print()
    print(markdown(results))
    print(f"\nwritten: {args.out} and {args.out_dir}/<section>.json ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
