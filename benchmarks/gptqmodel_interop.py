"""Does GPTQModel read qdiablo's GPTQ folders as qdiablo means them? Layer by layer, then logits.

GPTQModel needs a CUDA build of torch >= 2.14 (about 5 GB), so this runs in two environments:

1. In qdiablo's environment, quantize a model at each bit width and zero-point format, and write
   next to each folder a `<folder>.reference.safetensors`: every quantized layer's weight as
   qdiablo dequantizes it (fp16), and qdiablo's logits in fp16 and fp32 on a fixed prompt.

       python benchmarks/gptqmodel_interop.py export runs/interop --model smollm2 \\
           --bits 2 3 4 --formats gptq gptq_v2

   `--trained-scales` (tiny) writes a base whose fp16 scales carry folded scale multipliers, as
   `qdiablo export` writes the base of an adapter trained with `--train-scales`.

   `--model tiny` (the default) quantizes a small random LLaMA in-process; any other model goes
   through `python -m qdiablo quantize`, exactly as a user would write the folder.

2. In GPTQModel's own environment (`python3 -m venv /work/gptqmodel-venv &&
   /work/gptqmodel-venv/bin/pip install gptqmodel`), load each folder with GPTQModel in fp16 and
   compare (this half imports neither qdiablo nor quantizers, only torch and safetensors):

       /work/gptqmodel-venv/bin/python benchmarks/gptqmodel_interop.py check runs/interop \\
           --device cpu

   It writes `interop_summary.json` and `interop_summary.md` into the folder. Nothing of qdiablo
   needs installing there. `tests/test_gptqmodel_interop.py` runs its GPTQModel case in that venv
   (`pip install pytest` there; `PYTHONPATH=. /work/gptqmodel-venv/bin/python -m pytest
   -p no:logging tests/test_gptqmodel_interop.py`: the export half imports `quantizers` from the
   checkout, which needs only torch, transformers and safetensors).

Each folder gets one outcome:
- `match`: every layer's weight, as GPTQModel's own layer computes it, equals qdiablo's to fp16
  precision (each element within one fp16 ulp: |Δ| <= 2^-10·|w| + 2^-24), and, for 4-bit and
  wider, GPTQModel's fp16 logits are within 2·F of qdiablo's fp16 logits, F = max|qdiablo fp16 −
  qdiablo fp32| (the fp16 noise floor: two fp16 runs that each err by about F from the fp32
  result, in a different order of operations, differ by up to about 2·F). Below 4 bits, logits
  are reported but not judged: a 2-bit SmolLM2 is numerically chaotic (fp16 and fp32 logits
  differ by ~11).
- `refused`: GPTQModel's loader declines the folder by policy (asymmetric `gptq` v1 written by
  a producer other than GPTQModel). An outcome, not a failure.
- `mismatch` or `error`: a failure; the exit status is then 1.

GPTQModel's weight is read through the layer itself: its forward applied to the identity matrix
gives W^T exactly (each output is one product with 1.0 plus zeros), whatever kernel the backend
uses, without relying on GPTQModel's internals.

An export folder (`qdiablo export`) works too: its `base/` is the GPTQ folder.

       python benchmarks/gptqmodel_interop.py reference out/my-export runs/ref.safetensors
       python benchmarks/gptqmodel_interop.py check out/my-export --reference runs/ref.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May."
REFERENCE_SUFFIX = ".reference.safetensors"
WEIGHT_PREFIX = "weight::"
FP16_RTOL = 2.0**-10  # one fp16 ulp, relative: fp16 keeps 10 mantissa bits
FP16_ATOL = 2.0**-24  # the smallest fp16 subnormal, for weights that dequantize to ~0
LOGITS_JUDGED_FROM_BITS = 4
LOGITS_NOISE_FACTOR = 2.0  # GPTQModel's fp16 logits vs qdiablo's: within 2x the fp16 noise floor
REFUSAL_MARKERS = ("only supported if produced by",)


# --- the export half (qdiablo's environment) ------------------------------------------------


def quantize_tiny(
    folder: Path, bits: int, group_size: int, fmt: str, sym: bool, trained_scales: bool = False
) -> None:
    """A small random LLaMA quantized in-process with GPTQ (for tests and quick checks).
    `trained_scales`: its scales then multiplied by seeded multipliers in [0.8, 1.2] and folded
    into the fp16 scales, as `qdiablo export` writes a base trained with `--train-scales`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_llama, make_tokenizer

    from quantizers import QuantConfig, quantize_model, save_quantized, tokenize_calibration

    tokenizer = make_tokenizer()
    calib = tokenize_calibration(tokenizer, [PROMPT * 40], num_samples=8, seq_len=64)
    model = make_tiny_llama(seed=0, hidden=128, intermediate=256, heads=4, kv_heads=2)
    config = QuantConfig(bits=bits, group_size=group_size, sym=sym, checkpoint_format=fmt)
    quantize_model(model, calib, config)
    if trained_scales:
        from quantizers.trained_scales import add_multipliers, fold_multipliers, packed_layers

        add_multipliers(model, requires_grad=False)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in packed_layers(model).values():
                m = layer.scale_multiplier
                m.copy_(0.8 + 0.4 * torch.rand(m.shape, generator=gen))
        fold_multipliers(model)
    save_quantized(model, folder, tokenizer)


def quantize_cli(
    model: str,
    folder: Path,
    bits: int,
    group_size: int,
    fmt: str,
    sym: bool,
    method: str,
    calib_samples: int,
) -> None:
    """`qdiablo quantize`, as a user runs it, from this checkout."""
    cmd = [sys.executable, "-m", "qdiablo", "quantize", "--model", model, "--output", str(folder)]
    cmd += ["--method", method]
    cmd += f"--bits {bits} --group-size {group_size} --checkpoint-format {fmt}".split()
    cmd += ["--calib-samples", str(calib_samples), "--sym" if sym else "--no-sym"]
    print("$", " ".join(cmd), flush=True)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": path})


def write_reference(folder: Path, out_file: Path) -> None:
    """qdiablo's view of a GPTQ folder: each layer's fp16 weight, and fp16/fp32 logits."""
    from transformers import AutoTokenizer

    from quantizers import QuantLinear, load_quantized

    model = load_quantized(folder).eval()
    ids = AutoTokenizer.from_pretrained(folder)(PROMPT, return_tensors="pt").input_ids
    tensors = {"ids": ids}
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            tensors[WEIGHT_PREFIX + name] = layer.dequantize_weight(torch.float16).contiguous()
    with torch.no_grad():
        tensors["logits_fp32"] = model.float()(ids).logits[0].float()
        tensors["logits_fp16"] = model.half()(ids).logits[0].float()
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    metadata = {k: str(quant.get(k)) for k in ("bits", "group_size", "sym", "checkpoint_format")}
    atomic_save(tensors, out_file, metadata)
    print(f"{out_file}: {len(tensors) - 3} layers, reference logits", flush=True)


def export(
    out: Path,
    model: str,
    bits_list: list[int],
    formats: list[str],
    group_size: int,
    sym: bool,
    method: str = "gptq",
    calib_samples: int = 16,
    trained_scales: bool = False,
) -> None:
    """Quantize into OUT/w{bits}-{format}[-scales]/ (a finished folder with the same settings is
    reused, so an interrupted export resumes) and write each folder's reference next to it."""
    out.mkdir(parents=True, exist_ok=True)
    if trained_scales and model != "tiny":
        raise SystemExit("--trained-scales: tiny only; for a model, check a `qdiablo export`")
    for bits in bits_list:
        for fmt in formats:
            folder = out / f"w{bits}-{fmt}{'-scales' if trained_scales else ''}"
            wanted = {"bits": bits, "group_size": group_size, "sym": sym, "checkpoint_format": fmt}
            if (folder / "config.json").is_file():
                quant = json.loads((folder / "config.json").read_text())["quantization_config"]
                found = {k: quant.get(k) for k in wanted}
                if found != wanted:
                    raise SystemExit(f"{folder}: holds {found}, not {wanted}; remove it first")
                print(f"{folder}: reusing the finished quantization", flush=True)
            elif model == "tiny":
                quantize_tiny(folder, bits, group_size, fmt, sym, trained_scales)
            else:
                quantize_cli(model, folder, bits, group_size, fmt, sym, method, calib_samples)
            write_reference(folder, reference_file(folder))


def reference(export_dir: Path, out_file: Path) -> None:
    """The reference of a `qdiablo export` folder's base/ (after checking its manifest)."""
    from qdiablo.export import verify_export

    verify_export(export_dir)
    write_reference(export_dir / "base", out_file)


# --- shared by both halves -----------------------------------------------------------------


def reference_file(folder: Path) -> Path:
    return folder.with_name(folder.name + REFERENCE_SUFFIX)


def _temp_beside(path: Path) -> str:
    """A temporary file next to `path`, with the user's umask's mode (not mkstemp's 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = _temp_beside(path)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = _temp_beside(path)
    try:
        Path(tmp).write_text(text)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def probe_weight(
    layer: torch.nn.Module, in_features: int, dtype: torch.dtype, device: str | torch.device
) -> torch.Tensor:
    """A linear layer's weight [out, in] as its own forward computes it: layer(I) = W^T (+ bias).
    Exact in fp16: each output element is one product with 1.0 plus exact zeros."""
    eye = torch.eye(in_features, dtype=dtype, device=device)
    with torch.no_grad():
        out = layer(eye)
        bias = getattr(layer, "bias", None)
        if isinstance(bias, torch.Tensor):
            out = out - bias.to(out.dtype)
    return out.t().float().cpu()


def compare_weights(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    """Elementwise agreement to fp16 precision: |Δ| <= FP16_RTOL·|ours| + FP16_ATOL."""
    if ours.shape != theirs.shape:
        return {"within_fp16": False, "shape": [list(ours.shape), list(theirs.shape)]}
    ours, theirs = ours.float(), theirs.float()
    diff = (theirs - ours).abs()
    bound = ours.abs() * FP16_RTOL + FP16_ATOL
    return {
        "within_fp16": bool((diff <= bound).all()),
        "bit_identical": bool(torch.equal(ours, theirs)),
        "max_abs_diff": diff.max().item(),
        "max_abs_weight": ours.abs().max().item(),
        "outside": int((diff > bound).sum()),
    }


# --- the check half (GPTQModel's environment: torch and safetensors only) -------------------


def load_with_gptqmodel(folder: Path, device: str, backend: str):
    from gptqmodel import BACKEND, GPTQModel

    return GPTQModel.load(
        str(folder), device=device, backend=getattr(BACKEND, backend), dtype=torch.float16
    )


def check_folder(folder: Path, ref_file: Path, device: str, backend: str) -> dict:
    """One folder's outcome, per-layer comparison and logits."""
    with safe_open(str(ref_file), "pt") as f:
        meta = f.metadata() or {}
    ref = load_file(str(ref_file))
    row = {"folder": str(folder), "format": meta.get("checkpoint_format"), "bits": meta.get("bits")}
    try:
        model = load_with_gptqmodel(folder, device, backend).model
    except Exception as e:  # GPTQModel raises plain ValueError/TypeError/... on refusal
        message = f"{type(e).__name__}: {e}".splitlines()[0]
        refused = any(m in message for m in REFUSAL_MARKERS)
        return {**row, "outcome": "refused" if refused else "error", "message": message}
    layers = {}
    for key, ours in ref.items():
        if key.startswith(WEIGHT_PREFIX):
            name = key[len(WEIGHT_PREFIX) :]
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                layers[name] = {"within_fp16": False, "missing": True}
                continue
            theirs = probe_weight(layer, ours.shape[1], torch.float16, device)
            layers[name] = compare_weights(ours, theirs)
    with torch.no_grad():
        logits = model(ref["ids"].to(device)).logits[0].float().cpu()
    logits_diff = (logits - ref["logits_fp16"]).abs().max().item()
    logits_diff_fp32 = (logits - ref["logits_fp32"]).abs().max().item()
    noise_floor = (ref["logits_fp16"] - ref["logits_fp32"]).abs().max().item()
    judged = int(meta.get("bits", 0)) >= LOGITS_JUDGED_FROM_BITS
    weights_ok = all(r["within_fp16"] for r in layers.values())
    logits_ok = logits_diff <= LOGITS_NOISE_FACTOR * noise_floor or not judged
    return {
        **row,
        "outcome": "match" if weights_ok and logits_ok else "mismatch",
        "layers": len(layers),
        "layers_within_fp16": sum(r["within_fp16"] for r in layers.values()),
        "layers_bit_identical": sum(bool(r.get("bit_identical")) for r in layers.values()),
        "max_weight_diff": max(r.get("max_abs_diff", float("inf")) for r in layers.values()),
        "logits_diff_fp16": logits_diff,
        "logits_diff_vs_fp32": logits_diff_fp32,
        "logits_noise_floor": noise_floor,
        "logits_judged": judged,
        "same_argmax": bool((logits.argmax(-1) == ref["logits_fp16"].argmax(-1)).all()),
        "per_layer": layers,
    }


def summary_markdown(rows: list[dict], device: str, backend: str) -> str:
    lines = [
        f"GPTQModel (device {device}, BACKEND.{backend}, fp16) against qdiablo, per folder:",
        "",
        "| folder | format | bits | outcome | layers within fp16 | bit-identical | "
        "max weight diff | logits Δ vs qdiablo fp16 | Δ vs qdiablo fp32 | "
        "qdiablo fp16 vs fp32 | same argmax |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "layers" not in r:
            lines.append(
                f"| {Path(r['folder']).name} | {r['format']} | {r['bits']} | {r['outcome']}: "
                f"{r['message'][:120]} | | | | | | | |"
            )
            continue
        judged = "" if r["logits_judged"] else " (not judged)"
        lines.append(
            f"| {Path(r['folder']).name} | {r['format']} | {r['bits']} | {r['outcome']} | "
            f"{r['layers_within_fp16']}/{r['layers']} | {r['layers_bit_identical']}/{r['layers']} "
            f"| {r['max_weight_diff']:.3g} | {r['logits_diff_fp16']:.3g}{judged} | "
            f"{r['logits_diff_vs_fp32']:.3g} | {r['logits_noise_floor']:.3g} | {r['same_argmax']} |"
        )
    return "\n".join(lines) + "\n"


def check(out: Path, device: str, backend: str, reference: Path | None, summary: Path) -> int:
    if (out / "manifest.json").is_file() and (out / "base").is_dir():
        if reference is None:
            raise SystemExit(
                f"{out}: an export folder needs --reference FILE (the `reference` step)"
            )
        cases = [(out / "base", reference)]
    else:
        cases = [(reference_file(d), d) for d in sorted(out.iterdir()) if d.is_dir()]
        cases = [(d, ref) for ref, d in cases if ref.is_file()]
        if not cases:
            raise SystemExit(f"{out}: no folder with a {REFERENCE_SUFFIX} (run `export` first)")
    rows = []
    for folder, ref_file in cases:
        print(f"checking {folder} ...", flush=True)
        rows.append(check_folder(folder, ref_file, device, backend))
        brief = {k: v for k, v in rows[-1].items() if k != "per_layer"}
        print(json.dumps(brief), flush=True)
    summary.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(summary.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    markdown = summary_markdown(rows, device, backend)
    atomic_write_text(summary.with_suffix(".md"), markdown)
    print(markdown)
    return 1 if any(r["outcome"] in ("mismatch", "error") for r in rows) else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    e = sub.add_parser("export", help="quantize at each bit width/format, with references")
    e.add_argument("out", type=Path)
    e.add_argument("--model", default="tiny", help="'tiny' (random LLaMA) or a qdiablo --model")
    e.add_argument("--bits", type=int, nargs="+", default=[4])
    e.add_argument("--formats", nargs="+", choices=["gptq", "gptq_v2"], default=["gptq_v2"])
    e.add_argument("--group-size", type=int, default=64)
    e.add_argument("--sym", action="store_true")
    e.add_argument("--method", choices=["gptq", "rtn"], default="gptq", help="not for tiny")
    e.add_argument("--calib-samples", type=int, default=16)
    e.add_argument(
        "--trained-scales",
        action="store_true",
        help="tiny only: fold seeded scale multipliers into the base, as an export of a "
        "--train-scales adapter does",
    )
    c = sub.add_parser("check", help="load each folder with GPTQModel and compare")
    c.add_argument("out", type=Path, help="the `export` step's folder, or a qdiablo export")
    c.add_argument("--device", default="cpu")
    c.add_argument("--backend", default="TORCH", help="a gptqmodel.BACKEND name")
    c.add_argument("--reference", type=Path, help="the reference file, for an export folder")
    c.add_argument("--summary", type=Path, help="default: OUT/interop_summary.{json,md}")
    r = sub.add_parser("reference", help="qdiablo's reference for an export's base/")
    r.add_argument("export_dir", type=Path)
    r.add_argument("out_file", type=Path)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.step in ("export", "reference"):
        sys.path.insert(0, str(ROOT))  # this checkout's qdiablo and quantizers
    if args.step == "export":
        a = args
        export(
            a.out, a.model, a.bits, a.formats, a.group_size, a.sym, a.method, a.calib_samples,
            a.trained_scales,
        )  # fmt: skip
        return 0
    if args.step == "reference":
        reference(args.export_dir, args.out_file)
        return 0
    summary = args.summary or args.out / "interop_summary.json"
    return check(args.out, args.device, args.backend, args.reference, summary)


if __name__ == "__main__":
    sys.exit(main())
