"""`qdiablo eval`: the Math10K evaluation (GSM8K, SVAMP, MAWPS, AQuA) of a base plus an adapter.

The base is a full-precision model (a hub id, a local folder, or `smollm2`), a qdiablo quantized
folder (GPTQ/RTN, with quantize_config.json), or a full-precision model quantized to NF4 on load
(`--quant nf4`). An adapter folder (DiaBlo or PEFT LoRA) is optional. Results go to `--output`:
per-example JSON Lines, summary.json and results.md; a rerun resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

from eval.presets import DEFAULT_PRESET, PRESETS
from qdiablo.data import REFERENCE_MODES, TEMPLATES
from qdiablo.devices import add_device_argument
from qdiablo.errors import UserError
from qdiablo.hashing import adapter_digest
from qdiablo.kinds import BASE_QUANT_CHOICES, QUANT_FLAG_KINDS

HELP = "evaluate a model (+ adapter) on the Math10K test sets: accuracy and reference NLL"

log = logging.getLogger("qdiablo.eval")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default="smollm2",
        help="base: hub id, local folder, qdiablo quantized folder, or 'smollm2' (default)",
    )
    g.add_argument("--gguf-file", default=None, help="GGUF file inside --model's folder")
    g.add_argument(
        "--quant",
        choices=BASE_QUANT_CHOICES,
        default="none",
        help="quantize a full-precision base on load: nf4 = bitsandbytes NF4 + double quant; "
        "nf2 = NF2 fake-quantized (absmax per 64), as `qdiablo train --base nf2`",
    )
    g.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model)")
    g.add_argument("--adapter", default=None, help="adapter folder: DiaBlo or PEFT (LoRA)")
    g.add_argument(
        "--merge-adapter",
        action="store_true",
        help="fold the adapter into the base's weights before evaluating (faster)",
    )
    g.add_argument(
        "--force", action="store_true", help="load a DiaBlo adapter onto a different base"
    )
    _add_device_arguments(g)

    g = p.add_argument_group("tasks and protocol")
    g.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        metavar="TASK",
        help="set names (gsm8k SVAMP mawps AQuA AddSub MultiArith SingleEq), groups (math4: the "
        "four of the mean, the default; extra; all) or test file paths",
    )
    g.add_argument(
        "--task-file",
        action="append",
        default=None,
        metavar="FILE",
        help="a custom test file in the Math10K record format (repeatable); reported apart",
    )
    g.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=DEFAULT_PRESET,
        help="; ".join(
            f"{k}: {v.description}, {v.max_new_tokens} tokens" for k, v in PRESETS.items()
        ),
    )
    g.add_argument("--template", choices=list(TEMPLATES), default=None, help="override the preset")
    g.add_argument("--max-new-tokens", type=int, default=None, help="override the preset")
    g.add_argument("--num-beams", type=int, default=None, help="override the preset")
    g.add_argument("--limit", type=int, default=None, help="only the first N items of each set")
    g.add_argument(
        "--reference",
        choices=REFERENCE_MODES,
        default="output",
        help="NLL reference response: the record's output (answer sentence when empty), or "
        "always 'The answer is X.'",
    )
    g.add_argument("--no-nll", action="store_true", help="skip the reference-response NLL")
    g.add_argument("--nll-only", action="store_true", help="only the NLL, no generation")

    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=int, default=16, help="examples per batch")
    g.add_argument("--output", default="outputs/eval", help="results folder (resumable)")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="discard eval's results already there (your files are kept)",
    )
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_device_arguments(g) -> None:
    """Where the model runs, in what dtype, and whether packed layers keep a dequantized copy."""
    g.add_argument(
        "--dtype",
        default="auto",
        help="dtype of the float weights and the compute: auto (bfloat16 on a GPU that has it, "
        "float16 on older GPUs, float32 on the CPU), float32, bfloat16, float16",
    )
    add_device_argument(g, "the model runs")
    g.add_argument(
        "--dequant-cache",
        choices=["auto", "on", "off"],
        default="auto",
        help="packed (gptq/rtn) layers: on = dequantize every layer once and keep the float "
        "copies for the run (fast, the model's size again in --dtype); off = dequantize each "
        "layer at each call (or run the fused kernels), one layer's float weight at a time; "
        "auto = on when the copy takes at most half the memory free on the device",
    )


def run(args: argparse.Namespace) -> int:
    """Check the flags, hold the output folder, load the model (and adapter), evaluate."""
    # Deferred to keep `qdiablo --help` fast: these import torch and transformers.
    from eval.runner import MARKDOWN_FILE, evaluate, output_names
    from qdiablo.adapters.loading import adapter_kind
    from qdiablo.inputs import check_apart
    from qdiablo.outputs import OutputFolder

    settings, tasks = _settings(args)
    device, dtype = _device_and_dtype(args)
    check_apart(
        args.output,
        {
            "--model": args.model,
            "--tokenizer": args.tokenizer,
            "--adapter": args.adapter,
            "--task-file": [t.source for t in tasks if Path(t.source).is_file()],
        },
    )
    adapter = adapter_kind(args.adapter) if args.adapter else None  # fail before loading models
    # Hold the folder before loading anything: a second eval into it is refused at once.
    folder = OutputFolder(
        args.output,
        "eval",
        overwrite=args.overwrite,
        resumable=True,
        known=output_names(tasks),
        signature="run.json",
    )
    with folder:
        start = time.time()
        tokenizer, model, info = _load_model(args, device, dtype, adapter)
        cache = _dequant_cache(args.dequant_cache, model, dtype, device)
        settings = dataclasses.replace(settings, dequant_cache=cache)
        log.info("model ready on %s (%s) in %.0f s", device, info["dtype"], time.time() - start)

        summary = evaluate(
            model,
            tokenizer,
            tasks,
            args.output,
            settings,
            model_info=info,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    print(Path(args.output, MARKDOWN_FILE).read_text(encoding="utf-8"))
    print(f"results in {args.output} ({time.time() - start:.0f} s)")
    return 0 if summary else 1


def _settings(args: argparse.Namespace):
    """The evaluation settings and tasks, checked before anything loads (sets --threads)."""
    import torch

    from eval.math10k import resolve_tasks
    from eval.runner import EvalSettings

    if args.no_nll and args.nll_only:
        raise UserError("--no-nll and --nll-only exclude each other")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be ≥ 1 (omit it for torch's default)")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = EvalSettings(
        preset=args.preset,
        template=args.template,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        batch_size=args.batch_size,
        limit=args.limit,
        generate=not args.nll_only,
        nll=not args.no_nll,
        reference=args.reference,
    )
    settings.resolved()  # check the flags before loading anything
    tasks = resolve_tasks(
        [*(args.tasks or ([] if args.task_file else ["math4"])), *(args.task_file or [])]
    )
    return settings, tasks


def _load_model(args: argparse.Namespace, device, dtype, adapter: str | None):
    """The tokenizer, the base (with its adapter, merged if asked) and what summary.json
    records about them."""
    from qdiablo.adapters.loading import load_adapter
    from qdiablo.models import load_base, load_tokenizer

    dtype_name = str(dtype).removeprefix("torch.")
    tokenizer = _tokenizer(args, load_tokenizer)
    kind = QUANT_FLAG_KINDS[args.quant or "none"]  # `quant: null` in YAML means none
    model = load_base(args.model, kind, gguf_file=args.gguf_file, dtype=dtype_name, device=device)
    info = {
        "base": args.model,
        "gguf_file": args.gguf_file,
        "quant": args.quant,
        "dtype": dtype_name,
        "adapter": args.adapter,
        "adapter_kind": adapter,
        # A retrained adapter in the same folder must not resume the old one's results.
        "adapter_sha256": adapter_digest(args.adapter) if args.adapter else None,
        "merged": bool(args.adapter and args.merge_adapter),
    }
    if args.adapter:
        model = load_adapter(model, args.adapter, force=args.force, merge=args.merge_adapter)
    return tokenizer, model, info


def _device_and_dtype(args: argparse.Namespace):
    """--device by the one rule (TF32 allowed on a GPU); --dtype auto: the device's default."""
    from qdiablo.devices import allow_tf32, default_compute_dtype, resolve_device
    from qdiablo.sources import parse_dtype

    device = resolve_device(args.device)
    allow_tf32(device)
    dtype = default_compute_dtype(device) if args.dtype == "auto" else parse_dtype(args.dtype)
    return device, dtype


def _tokenizer(args: argparse.Namespace, load_tokenizer):
    try:
        return load_tokenizer(
            args.tokenizer or args.model, None if args.tokenizer else args.gguf_file
        )
    except UserError as e:
        raise UserError(str(e), hint="pass --tokenizer FOLDER (e.g. the original model's)") from e


def _dequant_cache(mode: str, model, dtype, device) -> bool:
    """--dequant-cache: on, off, or auto (the copy must fit in half the free memory)."""
    from eval.generate import dequant_cache_fits, has_quantized_layers
    from qdiablo.devices import available_memory

    if mode != "auto" or not has_quantized_layers(model):
        return mode != "off"
    fits, why = dequant_cache_fits(model, dtype, available_memory(device))
    log.info("%s", why)
    return fits
