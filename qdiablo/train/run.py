"""`train(config)`: one run from a base and an adapter setting to a saved adapter and its records.

Output folder layout:

    <output>/
      train_config.json       the resolved TrainConfig (checked again on --resume)
      train_results.json      counts, budgets, data summary, losses, throughput, memory, versions
      log.jsonl               every Trainer log record (loss, learning rate, grad norm, ...)
      adapter/                the final adapter (DiaBlo or PEFT LoRA folder format)
      checkpoints/checkpoint-<step>/   adapter + optimizer, scheduler, RNG and trainer state
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import set_seed

from qdiablo.errors import UserError
from qdiablo.faults import guard
from qdiablo.inputs import check_apart
from qdiablo.io import read_json, write_json
from qdiablo.kinds import PACKED_KINDS
from qdiablo.outputs import OutputFolder
from qdiablo.train.bases import LoadedBase
from qdiablo.train.checkpoint import checkpoint_problem, latest_checkpoint, save_adapter, unwrap
from qdiablo.train.config import (
    ADAPTER_DIR,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    LOG_FILE,
    RESULTS_FILE,
    RESUME_FREE_FIELDS,
    TrainConfig,
    field_defaults,
)
from qdiablo.train.dataset import PadCollator, select_records, tokenize_records
from qdiablo.train.fsdp import check_fsdp_launch, gather_trainable, packed_base_bytes
from qdiablo.train.health import LossRiseCallback
from qdiablo.train.metrics import JsonlLogCallback, ThroughputCallback, base_linear_bytes
from qdiablo.train.runtime import Runtime, resolve_runtime
from qdiablo.train.setup import RunSetup, is_main_process, say, set_up
from qdiablo.train.trainer import AdapterTrainer, training_arguments, world_size
from qdiablo.versions import library_versions

log = logging.getLogger(__name__)

OUTPUT_NAMES = (CONFIG_FILE, RESULTS_FILE, LOG_FILE, ADAPTER_DIR, CHECKPOINT_DIR)


@dataclass
class TrainResult:
    """Where a run wrote its outputs, and the records also saved in train_results.json."""

    output: Path
    adapter_dir: Path
    results: dict[str, Any]
    model: Any  # the trained adapter model (DiaBloModel or PeftModel), still in memory


def resolve_resume(
    config: TrainConfig, output: Path, folder: OutputFolder | None = None
) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); guards against mixing runs.

    Called by rank 0 while it holds the folder's lock (`folder`), so no live process writes
    there."""
    checkpoints = output / CHECKPOINT_DIR
    if config.resume is None or config.resume == "auto":
        found = latest_checkpoint(checkpoints)
        started = (output / CONFIG_FILE).exists() or checkpoints.exists()
        if found is None and (output / RESULTS_FILE).exists() and is_main_process():
            raise UserError(
                f"{output} already holds a training run, finished ({RESULTS_FILE})",
                hint="pass --overwrite to train afresh (removes only train's files), or choose "
                "another --output",
            )
        if found is None and not started and config.resume == "auto":
            raise UserError(f"--resume auto: no complete checkpoint in {checkpoints}")
        if found is None:
            if started and is_main_process():
                # Killed before its first complete checkpoint: nothing to resume, nothing to keep.
                say(
                    f"{output}: the earlier run stopped before its first complete checkpoint "
                    "and no process owns it: starting afresh"
                )
                _clear_run(folder)
            return None
        if config.resume is None and (output / RESULTS_FILE).exists() and is_main_process():
            raise UserError(
                f"{output} already holds a training run, finished ({RESULTS_FILE})",
                hint="pass --overwrite to train afresh (removes only train's files), or choose "
                "another --output",
            )
        if config.resume is None:
            # Only rank 0 checks: the other ranks may start after it has written train_config.
            if is_main_process():
                raise UserError(
                    f"{output} already holds a training run (newest complete checkpoint: "
                    f"{found.name})",
                    hint="pass --resume auto to continue it, --overwrite to start afresh "
                    "(removes only train's files), or choose another --output",
                )
            return None
        path = found
    else:
        path = Path(config.resume)
        problem = checkpoint_problem(path)
        if problem:
            raise UserError(f"--resume {path}: not a complete checkpoint ({problem})")
    saved_file = output / CONFIG_FILE
    if saved_file.is_file():
        saved = read_json(saved_file, what="training config")
        now, defaults = config.to_dict(), field_defaults()
        diff = [
            f"{k}: {saved.get(k)!r} → {v!r}"
            for k, v in now.items()
            if k not in RESUME_FREE_FIELDS and saved.get(k, defaults.get(k)) != v
        ]
        if diff:
            raise UserError(
                f"resuming {output} with other settings than it started with: {'; '.join(diff)}",
                hint=f"resume with the settings in {saved_file}",
            )
    return path


def _clear_run(folder: OutputFolder | None) -> None:
    """Remove the files of a run that never reached a checkpoint (train's own files only)."""
    if folder is not None:
        folder.remove_own([CONFIG_FILE, RESULTS_FILE, LOG_FILE, CHECKPOINT_DIR])


def _results(config, loaded, budget, other, own_count, model, data_summary, args) -> dict:
    """train_results.json's settings part: what was trained, on what, with which batches."""
    return {
        "adapter": config.adapter,
        "base": config.base,
        "base_description": loaded.description,
        "model": config.model,
        "trainable_parameters": own_count,
        "budget": budget.to_dict(),
        "matched_params": config.match_params,
        "other_method": other,
        "base_linear_layers": base_linear_bytes(model),
        "data": data_summary.to_dict(),
        "devices": args.world_size,
        "micro_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "effective_batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "device": str(args.device),
        "precision": config.precision,
        "gradient_checkpointing": config.gradient_checkpointing,
    }


def train(
    config: TrainConfig,
    base: LoadedBase | None = None,
    callbacks: list | None = None,
) -> TrainResult:
    """Train `config.adapter` on the frozen base; see the module docstring for the outputs.

    `base` may be passed pre-loaded (it is modified in place: adapters are attached to it);
    `callbacks` are extra `transformers.TrainerCallback`s.
    """
    output = Path(config.output)
    check_apart(
        output,
        {
            "--model": config.model,
            "--data": config.data,
            "--decontaminate": [d for d in config.decontaminate if Path(d).is_file()],
        },
    )
    config, runtime = resolve_runtime(config, world_size())  # `auto` made concrete: recorded
    under_fsdp = check_fsdp_launch(
        config.base, config.packed_storage, config.precision
    )  # FSDP1 / nf4 under FSDP: a clear error first
    if under_fsdp and (config.train_scales or config.distill):
        raise UserError(
            f"{'--train-scales' if config.train_scales else '--distill'} is not supported under "
            "FSDP (the scale multipliers and the teacher are not sharded)",
            hint="train it in one process or with DDP",
        )
    if config.train_scales and config.base not in PACKED_KINDS:
        raise UserError(
            f"--train-scales needs a packed base (--base gptq or rtn), not --base {config.base}",
            hint="quantize with `qdiablo quantize` and train on its folder",
        )
    folder = OutputFolder(
        output,
        "train",
        overwrite=config.overwrite,
        resumable=True,
        known=OUTPUT_NAMES,
        signature=CONFIG_FILE,
    )
    # Rank 0 holds the folder; the other ranks write their RNG state into its checkpoints.
    with folder if is_main_process() else contextlib.nullcontext():
        if is_main_process():
            folder.claim(OUTPUT_NAMES)
        held = folder if is_main_process() else None
        result = _train_into(output, config, base, callbacks, under_fsdp, runtime, held)
        if is_main_process():
            folder.finish()
    return result


def _train_into(
    output: Path,
    config: TrainConfig,
    base: LoadedBase | None,
    callbacks: list | None,
    under_fsdp: bool,
    runtime: Runtime,
    folder: OutputFolder | None = None,
) -> TrainResult:
    """The run proper, into a folder rank 0 holds (`folder`; None on the other ranks): the
    setup, Trainer's loop, the report."""
    resume_from = resolve_resume(config, output, folder)
    records, data_summary = select_records(
        config.data, config.answer_suffix, config.decontaminate, config.max_records, config.seed
    )
    set_seed(config.seed)
    sharded_loading = under_fsdp and base is None and config.base in PACKED_KINDS
    run = set_up(config, base, runtime, sharded_loading)
    dataset = tokenize_records(
        run.loaded.tokenizer, records, data_summary, config.template, config.max_length
    )
    say(data_summary.decontamination_line())
    args = training_arguments(config, str(output / CHECKPOINT_DIR))
    if folder is not None:
        folder.changing()  # from here a failure leaves the run unfinished, never finished-looking
    if is_main_process() and resume_from is None:
        with guard(output):
            write_json(output / CONFIG_FILE, config.to_dict())

    throughput = ThroughputCallback()
    rising = LossRiseCallback(output / LOG_FILE)
    trainer = AdapterTrainer(
        model=run.model,
        args=args,
        train_dataset=dataset,
        data_collator=PadCollator(run.loaded.tokenizer.pad_token_id),
        callbacks=[throughput, JsonlLogCallback(output / LOG_FILE), rising, *(callbacks or [])],
        load_shards=run.load_shards,
        keep_checkpoints=config.save_total_limit,
        scale_lr=config.scale_lr if config.train_scales else None,
        teacher=run.teacher,
        distill_weight=config.distill_weight,
    )
    model = unwrap(trainer.model) if sharded_loading else run.model
    with guard(output):
        outcome = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    # The last steps since the last check, and the final loss: a NaN adapter is never the result.
    trainer.health.check(model, trainer.state.global_step, final_loss=outcome.training_loss)

    results = _results(
        config, run.loaded, run.budget, run.other, run.own_count, model, data_summary, args
    )
    results.update(_outcome(trainer, outcome, throughput, resume_from, runtime, run, config))
    results["warnings"] = rising.warnings
    if under_fsdp:
        results["fsdp"] = {
            "version": 2,
            "sharded_loading": sharded_loading,
            "packed_base_bytes_rank0": packed_base_bytes(model),
        }
    adapter_dir = _save_run(output, model, trainer, results, under_fsdp)
    return TrainResult(output, adapter_dir, results, model)


def _outcome(trainer, outcome, throughput, resume_from, runtime, run: RunSetup, config) -> dict:
    """train_results.json's outcome part: steps, losses, throughput, what the run used."""
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {
        "global_step": trainer.state.global_step,
        "epochs_done": trainer.state.epoch,
        "train_loss": outcome.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "train_runtime_seconds": outcome.metrics.get("train_runtime"),
        "throughput": throughput.summary(),
        "resumed_from": str(resume_from) if resume_from else None,
        "runtime": runtime.to_dict(),
        "trained_scales": run.scale_count,
        "distill": config.distill,
        "versions": library_versions(),
    }


def _save_run(output: Path, model, trainer, results: dict, under_fsdp: bool) -> Path:
    """Write the final adapter and train_results.json (rank 0), and say what was trained."""
    adapter_dir = output / ADAPTER_DIR
    gathered = gather_trainable(model) if under_fsdp else None  # a collective: every rank
    if trainer.is_world_process_zero():
        with guard(output):
            # File by file (a file of the user's in adapter/ stays); the run's marker is
            # completed only after train_results.json, so a torn adapter/ never looks finished.
            save_adapter(model, adapter_dir, gathered)
            write_json(output / RESULTS_FILE, results)
        tps = results["throughput"]["tokens_per_second"]
        first, last = results["first_logged_loss"], results["last_logged_loss"]
        say(
            f"trained {trainer.state.global_step} steps"
            + (f", loss {first:.4f} → {last:.4f}" if first is not None else "")
            + (f", {tps:.0f} tokens/s" if tps else "")
            + f"; adapter saved to {adapter_dir}"
            + "".join(f"\nwarning: {w}" for w in results["warnings"])
        )
    return adapter_dir
