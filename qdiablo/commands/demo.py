"""`qdiablo demo`: fine-tune DiaBlo blocks on the embedded SmolLM2-135M-Instruct, offline.

Trains on the real Math10K records shipped in the package and prints the held-out response loss
before and after, plus one generated answer. Needs no network and no user files.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import time

HELP = "fine-tune DiaBlo on SmolLM2-135M-Instruct with shipped Math10K records (offline)"

log = logging.getLogger("qdiablo.demo")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="hub id, local folder, or 'smollm2'")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model's folder")
    p.add_argument("--num-blocks", type=int, default=64, help="DiaBlo blocks per layer (N)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-length", type=int, default=256, help="tokens per example")
    p.add_argument("--heldout", type=int, default=24, help="held-out records for the loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="folder to save the trained adapter in")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from qdiablo import DiaBloConfig, get_diablo_model
    from qdiablo.data import (
        EVAL_SETS,
        build_prompt,
        decontaminate,
        encode_prompt,
        encode_records,
        load_shipped_train_records,
        load_test_set,
        pad_batch,
    )
    from qdiablo.models import load_model, load_tokenizer

    start = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model, args.gguf_file)
    model = load_model(args.model, args.gguf_file)

    records, dropped = decontaminate(
        load_shipped_train_records(), {name: load_test_set(name) for name in EVAL_SETS}
    )
    log.info("decontamination dropped %s training records (%s)", sum(dropped.values()), dropped)
    random.shuffle(records)
    heldout, train = records[: args.heldout], records[args.heldout :]
    train_examples = encode_records(tokenizer, train, max_length=args.max_length)
    heldout_examples = encode_records(tokenizer, heldout, max_length=args.max_length)

    model = get_diablo_model(model, DiaBloConfig(num_blocks=args.num_blocks))
    model.print_trainable_parameters()

    def heldout_loss() -> float:
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(heldout_examples), args.batch_size):
                batch = pad_batch(heldout_examples[i : i + args.batch_size], tokenizer.pad_token_id)
                n = int((batch["labels"][:, 1:] != -100).sum())
                total += model(**batch).loss.item() * n
                count += n
        return total / max(count, 1)

    before = heldout_loss()
    print(f"held-out response loss before: {before:.4f} (ppl {math.exp(before):.2f})")

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, args.steps // 10), args.steps)
    model.train()
    order = list(range(len(train_examples)))
    random.shuffle(order)
    bar = tqdm(range(args.steps), desc="training DiaBlo", unit="step")
    for step in bar:
        idx = [order[(step * args.batch_size + j) % len(order)] for j in range(args.batch_size)]
        batch = pad_batch([train_examples[i] for i in idx], tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")

    after = heldout_loss()
    print(f"held-out response loss after:  {after:.4f} (ppl {math.exp(after):.2f})")

    question = heldout[0]
    model.eval()
    ids = torch.tensor([encode_prompt(tokenizer, question.instruction)])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=160,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    print("\n" + build_prompt(question.instruction).strip())
    print(answer.strip())
    print(f"(reference answer: {question.answer})")
    if args.output:
        model.save_pretrained(args.output)
        print(f"adapter saved to {args.output}")
    print(f"demo finished in {time.time() - start:.0f} s")
    return 0
