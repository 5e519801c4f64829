"""Evaluation generation speed: qdiablo's batched generation vs one-at-a-time `generate`.

Side by side in one process, on the same examples and the same greedy protocol (the `apiq`
preset: clean Alpaca template, greedy, up to --max-new-tokens new tokens, EOS stops):

- `ours`: `eval.generate.generate` — length-sorted batches, left padding, KV cache, rows dropped
  from the batch and the cache as soon as they emit EOS;
- `generate, batched`: `model.generate` on the same left-padded, length-sorted batches (finished
  rows keep computing until the whole batch is done);
- `cache on`: `model.generate` one example at a time, KV cache on (what most scripts do);
- `cache off`: `model.generate` one example at a time with `use_cache=False` (LLM-Adapters'
  evaluate.py); capped at --cache-off-examples, since each step recomputes the whole sequence.

The cache-off baseline runs on the first few examples only. To compare it on equal terms, the
script also times `cache on` on exactly those examples and reports the cache-off/cache-on ratio
there; the cache-off speed on the full set is projected from it (stated as such in the output).

    python benchmarks/bench_eval_generation.py --examples 16 --batch-size 16

Timings on a shared CPU are noisy: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--task", default="gsm8k")
    p.add_argument("--examples", type=int, default=16)
    p.add_argument("--cache-off-examples", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()

    import torch

    from eval.generate import batch_order, eos_token_ids, generate, left_pad, pad_token_id
    from qdiablo.data import encode_prompt, load_test_set
    from qdiablo.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    records = load_test_set(args.task)[: args.examples]
    prompts = [encode_prompt(tokenizer, r.instruction, "alpaca") for r in records]
    eos = eos_token_ids(model, tokenizer)
    pad = pad_token_id(tokenizer, eos)

    def one_at_a_time(ids: list[int], use_cache: bool) -> list[int]:
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                use_cache=use_cache,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        new = out[0, x.shape[1] :].tolist()
        return new[: next((i for i, t in enumerate(new) if t in eos), len(new))]

    # Warm-up (first-call allocations, lazy inits), not timed.
    generate(
        model,
        prompts[:2],
        eos_token_ids=eos,
        pad_token_id=pad,
        max_new_tokens=4,
        batch_size=2,
        progress=False,
    )
    one_at_a_time(prompts[0][:32], True)

    t = time.perf_counter()
    ours = generate(
        model,
        prompts,
        eos_token_ids=eos,
        pad_token_id=pad,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=False,
    )
    t_ours = time.perf_counter() - t

    hf_batched: list[list[int] | None] = [None] * len(prompts)
    t = time.perf_counter()
    for batch in batch_order(prompts, args.batch_size):
        ids, mask = left_pad([prompts[i] for i in batch], pad, "cpu")
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        for i, row in zip(batch, out[:, ids.shape[1] :].tolist()):
            hf_batched[i] = row[: next((j for j, t in enumerate(row) if t in eos), len(row))]
    t_hf_batched = time.perf_counter() - t

    t_on_each, on = [], []
    for ids in prompts:
        t = time.perf_counter()
        on.append(one_at_a_time(ids, True))
        t_on_each.append(time.perf_counter() - t)
    t_on = sum(t_on_each)

    k = min(args.cache_off_examples, len(prompts))
    t = time.perf_counter()
    off = [one_at_a_time(ids, False) for ids in prompts[:k]]
    t_off = time.perf_counter() - t
    t_on_k = sum(t_on_each[:k])

    n = len(prompts)
    new_tokens = [len(g.token_ids) for g in ours]
    same_on = sum(g.token_ids == o for g, o in zip(ours, on))
    same_off = sum(g.token_ids == o for g, o in zip(ours, off))
    off_over_on = t_off / t_on_k
    result = {
        "model": args.model,
        "task": args.task,
        "examples": n,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "new_tokens_mean": sum(new_tokens) / n,
        "stopped_at_length": sum(g.stopped == "length" for g in ours),
        "ours_s": t_ours,
        "ours_ex_per_s": n / t_ours,
        "hf_batched_s": t_hf_batched,
        "hf_batched_ex_per_s": n / t_hf_batched,
        "identical_to_hf_batched": f"{sum(g.token_ids == o for g, o in zip(ours, hf_batched))}/{n}",
        "cache_on_s": t_on,
        "cache_on_ex_per_s": n / t_on,
        "cache_off_examples": k,
        "cache_off_s": t_off,
        "cache_off_ex_per_s_measured": k / t_off,
        "cache_on_same_examples_s": t_on_k,
        "cache_off_over_cache_on": off_over_on,
        "cache_off_ex_per_s_projected": n / (t_on * off_over_on),
        "speedup_vs_cache_on": t_on / t_ours,
        "speedup_vs_cache_off_projected": t_on * off_over_on / t_ours,
        "identical_to_cache_on": f"{same_on}/{n}",
        "identical_to_cache_off": f"{same_off}/{k}",
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_avg_at_end": os.getloadavg()[0],
    }
    print(
        f"{n} {args.task} prompts, greedy, ≤{args.max_new_tokens} new tokens "
        f"(mean {result['new_tokens_mean']:.0f}, {result['stopped_at_length']} hit the cap), "
        f"{args.threads} threads"
    )
    print(f"  ours (batch {args.batch_size}):     {t_ours:8.1f} s  {n / t_ours:.3f} ex/s")
    print(
        f"  generate, same batches:   {t_hf_batched:8.1f} s  {n / t_hf_batched:.3f} ex/s  "
        f"-> ours is {t_hf_batched / t_ours:.1f}x faster"
    )
    print(
        f"  one at a time, cache on:  {t_on:8.1f} s  {n / t_on:.3f} ex/s  "
        f"-> ours is {t_on / t_ours:.1f}x faster"
    )
    print(
        f"  one at a time, cache off: {t_off:8.1f} s on the first {k} "
        f"({k / t_off:.3f} ex/s measured); cache on took {t_on_k:.1f} s on those, "
        f"so cache off is {off_over_on:.1f}x slower than cache on"
    )
    print(
        f"  projected cache off on all {n}: {n / (t_on * off_over_on):.4f} ex/s "
        f"-> ours is {t_on * off_over_on / t_ours:.1f}x faster"
    )
    print(
        f"  identical outputs: {same_on}/{n} vs cache on, {same_off}/{k} vs cache off, "
        f"{result['identical_to_hf_batched']} vs generate batched"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
