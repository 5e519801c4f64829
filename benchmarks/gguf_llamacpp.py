"""Does llama.cpp run qdiablo's GGUF export as qdiablo means it? Greedy tokens, side by side.

Two halves, because llama-cpp-python (a C++ build of llama.cpp) lives in its own environment:

1. In qdiablo's environment, for an export folder written with `--requantize --gguf`:

       python benchmarks/gguf_llamacpp.py reference out/w4

   checks the GGUF's blocks against `merged-gptq/` (gguf's dequantizer vs qdiablo's weights),
   loads the GGUF with transformers and compares its logits with merged-gptq/'s on a chat
   prompt, and writes `out/w4.gguf_check.json` beside the export (not inside it: the export holds
   only its manifest's files): the prompt's token ids, and the first greedy tokens of
   merged-gptq/ (qdiablo) and of the GGUF under transformers.

2. In llama-cpp-python's environment (`python3 -m venv /work/llamacpp-venv &&
   /work/llamacpp-venv/bin/pip install llama-cpp-python`; it compiles llama.cpp):

       /work/llamacpp-venv/bin/python benchmarks/gguf_llamacpp.py llamacpp out/w4

   loads the GGUF with llama.cpp on CPU, tokenizes the same prompt with llama.cpp's own
   tokenizer (compared with the reference ids), generates greedily from the reference ids and
   prints the three token sequences and where they first differ (this half imports neither
   torch nor qdiablo). Exit status 0 when llama.cpp's tokens equal qdiablo's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROMPT = [
    {
        "role": "user",
        "content": "Natalia sold 48 clips in April and half as many in May. "
        "How many clips did she sell in total?",
    }
]
NEW_TOKENS = 16


def _gguf_file(export: Path) -> Path:
    files = sorted((export / "gguf").glob("*.gguf"))
    if len(files) != 1:
        sys.exit(f"{export}/gguf: expected one .gguf file, found {len(files)}")
    return files[0]


def _greedy(model, ids: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def reference(export: Path) -> int:
    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantizers import QuantLinear, load_quantized

    file = _gguf_file(export)
    requant = load_quantized(export / "merged-gptq").float().eval()
    reader = gguf.GGUFReader(str(file))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    worst = 0.0
    for name, layer in requant.named_modules():
        if isinstance(layer, QuantLinear) and ("q_proj" in name or "k_proj" in name):
            continue  # rows permuted for llama.cpp's rotary layout; tests/test_serving.py checks
        if isinstance(layer, QuantLinear):
            i = int(name.split(".")[2])
            short = {
                "v_proj": "attn_v",
                "o_proj": "attn_output",
                "gate_proj": "ffn_gate",
                "up_proj": "ffn_up",
                "down_proj": "ffn_down",
            }[name.rsplit(".", 1)[1]]
            t = next(t for t in reader.tensors if t.name == f"blk.{i}.{short}.weight")
            got = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            want = layer.dequantize_weight(torch.float32).numpy()
            worst = max(worst, float(np.abs(got - want).max()))
    tokenizer = AutoTokenizer.from_pretrained(export / "merged-gptq")
    text = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    hf = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    with torch.no_grad():
        a = requant(input_ids=torch.tensor([ids])).logits
        b = hf(input_ids=torch.tensor([ids])).logits
    result = {
        "gguf": str(file),
        "tensor_types": sorted(set(kinds.values())),
        "max_weight_diff_vs_merged_gptq": worst,
        "max_logit_diff": (a - b).abs().max().item(),
        "max_abs_logit": a.abs().max().item(),
        "argmax_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "prompt_text": tokenizer.decode(ids),
        "prompt_ids": ids,
        "qdiablo_tokens": _greedy(requant, ids, NEW_TOKENS),
        "transformers_gguf_tokens": _greedy(hf, ids, NEW_TOKENS),
    }
    out = export.with_name(export.name + ".gguf_check.json")
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "prompt_ids"}, indent=2))
    print(f"wrote {out}")
    return 0


def llamacpp(export: Path) -> int:
    from llama_cpp import Llama

    ref = json.loads(export.with_name(export.name + ".gguf_check.json").read_text())
    llm = Llama(model_path=str(_gguf_file(export)), n_ctx=512, n_threads=1, verbose=False)
    own_ids = llm.tokenize(ref["prompt_text"].encode("utf-8"), add_bos=False, special=True)
    tokens = []
    for tok in llm.generate(ref["prompt_ids"], temp=0.0, top_k=1, reset=True):
        tokens.append(int(tok))
        if len(tokens) == NEW_TOKENS:
            break
    rows = {
        "qdiablo (merged-gptq/)": ref["qdiablo_tokens"],
        "transformers (GGUF)": ref["transformers_gguf_tokens"],
        "llama.cpp (GGUF)": tokens,
    }
    for name, seq in rows.items():
        print(f"{name:24s} {seq}  {llm.detokenize(seq).decode('utf-8', 'replace')!r}")
    same = tokens == ref["qdiablo_tokens"]
    first = next((i for i, (x, y) in enumerate(zip(tokens, ref["qdiablo_tokens"])) if x != y), None)
    print(f"llama.cpp's prompt tokenization equals transformers': {own_ids == ref['prompt_ids']}")
    print(
        f"llama.cpp's tokens equal qdiablo's: {same}"
        + ("" if same else f" (first differ at {first})")
    )
    return 0 if same else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("half", choices=["reference", "llamacpp"])
    p.add_argument("export", type=Path, help="an export folder written with --requantize --gguf")
    args = p.parse_args()
    return reference(args.export) if args.half == "reference" else llamacpp(args.export)


if __name__ == "__main__":
    sys.exit(main())
