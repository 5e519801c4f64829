"""Does GPTQModel load qdiablo's GPTQ export, and do its logits match ours?

GPTQModel needs torch >= 2.14 (a CUDA build, about 5 GB), so the check runs in two environments:

1. In qdiablo's environment, export a tiny random LLaMA quantized to 4 bits, with reference
   logits computed by qdiablo's own QuantLinear:

       python benchmarks/gptqmodel_interop.py export runs/interop

2. In a separate environment with the `gptq` extra (`pip install gptqmodel`, CUDA torch),
   load the folder with GPTQModel and compare (this step imports neither qdiablo nor
   quantizers):

       python benchmarks/gptqmodel_interop.py check runs/interop [--device cuda]

An export folder (`qdiablo export`) works too: its `base/` is the GPTQ folder. Compute the
reference logits with qdiablo (this also checks the export's manifest), then check in the other
environment:

       python benchmarks/gptqmodel_interop.py reference out/my-export runs/my-export-ref.pt
       python benchmarks/gptqmodel_interop.py check out/my-export --reference runs/my-export-ref.pt

Measured 2026-11-23 with GPTQModel 7.7.0 (CPU, BACKEND.TORCH): the asymmetric W4 g32 `gptq_v2`
folder loads and its logits match qdiablo's (max |diff| 0.0096 at max |logit| 1.12, same
argmax everywhere); the asymmetric `gptq` (v1) folder is refused by GPTQModel's loader ("sym=False
with format=gptq is only supported if produced by gptqmodel >= 0.9.0"), which is why qdiablo
writes `gptq_v2` by default.

The check passes when GPTQModel's logits match qdiablo's to fp16 precision (both run the
dequantized weights; GPTQModel computes in fp16). Exit status 0 = match, 1 = mismatch. The
export writes both zero-point conventions: `runs/interop/gptq` (v1) and `runs/interop/gptq_v2`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

TOKENS = [[1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 50]]


def export(out: Path, bits: int, group_size: int, sym: bool) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_tiny_llama, make_tokenizer

    from quantizers import QuantConfig, quantize_model, save_quantized, tokenize_calibration

    tokenizer = make_tokenizer()
    text = "Natalia sold clips to 48 of her friends in April, and half as many in May. " * 40
    calib = tokenize_calibration(tokenizer, [text], num_samples=16, seq_len=128)
    ids = torch.tensor(TOKENS)
    for fmt in ("gptq", "gptq_v2"):
        model = make_tiny_llama(seed=0, hidden=256, intermediate=512, heads=8, kv_heads=4)
        config = QuantConfig(bits=bits, group_size=group_size, sym=sym, checkpoint_format=fmt)
        quantize_model(model, calib, config)
        folder = out / fmt
        save_quantized(model, folder, tokenizer)
        with torch.no_grad():
            logits = model(ids).logits[0]
        torch.save({"ids": ids, "logits": logits}, folder / "reference_logits.pt")
        print(f"exported {folder} ({fmt}, W{bits} g{group_size}, sym={sym})")


def is_export(folder: Path) -> bool:
    """A `qdiablo export` folder: manifest.json plus base/ (the GPTQ layout)."""
    return (folder / "manifest.json").is_file() and (folder / "base").is_dir()


def reference(export_dir: Path, out_file: Path) -> None:
    """qdiablo's logits for an export's base/ (after checking the export's manifest)."""
    from qdiablo.export import verify_export
    from quantizers import load_quantized

    verify_export(export_dir)
    model = load_quantized(export_dir / "base")
    ids = torch.tensor(TOKENS)
    with torch.no_grad():
        logits = model(ids).logits[0]
    out_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"ids": ids, "logits": logits}, out_file)
    print(f"reference logits of {export_dir / 'base'} saved to {out_file}")


def check(out: Path, device: str, backend: str, reference_file: Path | None = None) -> int:
    from gptqmodel import BACKEND, GPTQModel

    if is_export(out):
        if reference_file is None:
            raise SystemExit("an export folder needs --reference FILE (see the `reference` step)")
        cases = [("export base/", out / "base", reference_file)]
    else:
        cases = [(f, out / f, out / f / "reference_logits.pt") for f in ("gptq", "gptq_v2")]
    failures = 0
    for fmt, folder, ref_file in cases:
        ref = torch.load(ref_file, weights_only=True)
        model = GPTQModel.load(str(folder), device=device, backend=getattr(BACKEND, backend))
        with torch.no_grad():
            logits = model.model(ref["ids"].to(device)).logits[0].float().cpu()
        diff = (logits - ref["logits"]).abs().max().item()
        scale = ref["logits"].abs().max().item()
        same_argmax = bool((logits.argmax(-1) == ref["logits"].argmax(-1)).all())
        ok = diff <= 2e-2 * scale and same_argmax
        failures += not ok
        print(
            json.dumps(
                {
                    "format": fmt,
                    "max_abs_diff": diff,
                    "max_abs_logit": scale,
                    "same_argmax": same_argmax,
                    "match": ok,
                    "backend": backend,
                    "device": device,
                }
            )
        )
    return 1 if failures else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    e = sub.add_parser("export", help="quantize a tiny model and save it with reference logits")
    e.add_argument("out", type=Path)
    e.add_argument("--bits", type=int, default=4)
    e.add_argument("--group-size", type=int, default=32)
    e.add_argument("--sym", action="store_true")
    c = sub.add_parser("check", help="load the export with GPTQModel and compare logits")
    c.add_argument("out", type=Path, help="the `export` step's folder, or a qdiablo export")
    c.add_argument("--device", default="cuda")
    c.add_argument("--backend", default="TORCH", help="a gptqmodel.BACKEND name")
    c.add_argument("--reference", type=Path, help="reference logits, for an export folder")
    r = sub.add_parser("reference", help="qdiablo's reference logits for an export's base/")
    r.add_argument("export_dir", type=Path)
    r.add_argument("out_file", type=Path)
    args = p.parse_args()
    if args.step == "export":
        export(args.out, args.bits, args.group_size, args.sym)
        return 0
    if args.step == "reference":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        reference(args.export_dir, args.out_file)
        return 0
    return check(args.out, args.device, args.backend, args.reference)


if __name__ == "__main__":
    sys.exit(main())
