"""Hugging Face `Trainer`, set up for adapters on frozen (possibly packed) bases.

Trainer brings gradient accumulation, the schedule with warmup, clipping, mixed precision,
gradient checkpointing, logging, checkpoint rotation, resume and multi-device (accelerate: DDP on
GPUs, gloo on CPUs, or FSDP2). `AdapterTrainer` changes only what it saves and loads: the adapter,
never the frozen base (see `qdiablo.train.checkpoint`); under FSDP the gathered adapter and an
unsharded optimizer state (see `qdiablo.train.fsdp`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerState, TrainingArguments
from transformers.trainer_utils import TrainOutput

from qdiablo.adapters.registry import method_of
from qdiablo.devices import resolve_device
from qdiablo.errors import UserError
from qdiablo.faults import guard
from qdiablo.optional import prepare_trainer_imports
from qdiablo.train import fsdp
from qdiablo.train.checkpoint import (
    TRAINER_STATE,
    load_adapter_weights,
    rotate_checkpoints,
    save_adapter,
    unwrap,
)
from qdiablo.train.config import OPTIMIZERS, TrainConfig
from qdiablo.train.distill import distillation_loss, next_token_mask
from qdiablo.train.health import HealthMonitor

TRAINING_ARGS_NAME = "training_args.bin"
SCHEDULER_NAME = "scheduler.pt"


class AdapterTrainer(Trainer):
    """A Trainer whose checkpoints hold the adapter only, and which reloads it strictly; it
    stops a diverged run (`qdiablo.train.health`), names OS faults while saving in one line,
    rotates checkpoints by step, removing only the files it wrote; with trained scales in their
    own optimizer group, and optionally a distillation teacher."""

    def __init__(
        self,
        model: nn.Module,
        *args,
        load_shards=None,
        keep_checkpoints=None,
        scale_lr: float | None = None,
        teacher: nn.Module | None = None,
        distill_weight: float = 1.0,
        **kwargs,
    ):
        """`load_shards(accelerator, model)`: shards a model built on the meta device and fills
        this process's shards (FSDP's sharded loading, `qdiablo.train.fsdp_loading`).
        `keep_checkpoints`: how many of the newest checkpoints to keep (None: all).
        `scale_lr`: the learning rate of trained scale multipliers (`--train-scales`);
        `teacher`: the full-precision model to distil from, `distill_weight` its loss share."""
        self.keep_checkpoints = keep_checkpoints
        self.scale_lr = scale_lr
        self.teacher = teacher
        self.distill_weight = distill_weight
        method_of(model).prepare_for_trainer(model)  # Trainer's check for attached adapters
        prepare_trainer_imports()  # Trainer imports PEFT (and it bitsandbytes): quietly first
        super().__init__(model, *args, **kwargs)
        if load_shards is not None:
            self.model = self.model_wrapped = load_shards(self.accelerator, self.model)
        self.health = HealthMonitor(Path(self.args.output_dir))
        if teacher is not None:
            # compute_loss returns a per-micro-batch mean: let Trainer divide it by the
            # accumulation steps (the LM loss alone is normalised over the whole batch instead).
            self.loss_is_scaled_for_ga = False

    def train(self, resume_from_checkpoint: str | None = None, **kwargs) -> TrainOutput:
        """Trainer.train, except that resuming from the run's last checkpoint (killed after it,
        before the adapter was written) trains no further step: Trainer would take one more."""
        if resume_from_checkpoint:
            state = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, TRAINER_STATE))
            if 0 < state.max_steps <= state.global_step:
                self._load_from_checkpoint(resume_from_checkpoint)
                self.state = state
                return TrainOutput(state.global_step, logged_train_loss(state), {})
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # ---- numerical health: flags on the device, read at logging/saving steps ----------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.health.observe(loss=loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self.health.observe(grad_norm=grad_norm)
        return grad_norm

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, *args, **kwargs):
        if self.control.should_log or self.control.should_save:
            self.health.check(unwrap(model), self.state.global_step)
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, *args, **kwargs)

    # ---- saving: one line for an OS fault, rotation by step ---------------------------------

    def _save_checkpoint(self, model, trial) -> None:
        folder = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        with guard(folder):
            super()._save_checkpoint(model, trial)
        if self.args.should_save and self.keep_checkpoints:
            rotate_checkpoints(Path(self.args.output_dir), self.keep_checkpoints)

    def create_optimizer(self, model: nn.Module | None = None):
        """Trainer's optimizer for the adapter, plus one group (no weight decay) at `scale_lr`
        for trained scale multipliers."""
        target = model if model is not None else self.model
        scales = [
            p
            for n, p in target.named_parameters()
            if n.endswith("scale_multiplier") and p.requires_grad
        ]
        if not scales:
            return super().create_optimizer(model)
        for p in scales:  # hidden from Trainer's own grouping, then added as their own group
            p.requires_grad_(False)
        try:
            optimizer = super().create_optimizer(model)
        finally:
            for p in scales:
                p.requires_grad_(True)
        optimizer.add_param_group({"params": scales, "lr": self.scale_lr, "weight_decay": 0.0})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The LM loss, or with a teacher w·KL(teacher ‖ student) + (1 − w)·LM loss."""
        if self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_logits = self.teacher(
                input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")
            ).logits
        mask = next_token_mask(inputs.get("attention_mask"), inputs["input_ids"])
        kl = distillation_loss(outputs.logits[:, :-1], teacher_logits[:, :-1], mask)
        w = self.distill_weight
        loss = kl if w == 1 else w * kl + (1 - w) * outputs.loss
        return (loss, outputs) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        save_adapter(self.model, output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None):
        target = model if model is not None else self.model
        load_adapter_weights(unwrap(target), resume_from_checkpoint)

    # ---- FSDP: the gathered adapter, an unsharded optimizer state ---------------------------

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if fsdp.fsdp_requested() and not self.is_fsdp_enabled and not torch.cuda.is_available():
            fsdp.enable_on_cpu(self.accelerator)  # CPU processes (gloo): tests, small runs
            self.is_fsdp_enabled = True

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        gathered = fsdp.gather_trainable(unwrap(self.model))  # every rank takes part
        if self.args.should_save:
            save_adapter(self.model, output_dir, gathered)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _raw_optimizer(self):
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        fsdp.save_full_optimizer(
            self.model, self._raw_optimizer(), output_dir, self.args.should_save
        )
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not (
            self.is_fsdp_enabled
            or fsdp.saved_by_name(os.path.join(checkpoint, fsdp.FSDP_OPTIMIZER))
        ):
            return super()._load_optimizer_and_scheduler(checkpoint)
        # an FSDP checkpoint (state keyed by parameter name), into any number of processes
        fsdp.load_full_optimizer(self.model, self._raw_optimizer(), checkpoint)
        state = torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True)
        self.lr_scheduler.load_state_dict(state)


def logged_train_loss(state: TrainerState) -> float:
    """The mean training loss over the steps the log covers (each logged loss is the mean of
    its interval), as Trainer reports it at the end of a run."""
    total, previous = 0.0, 0
    for record in state.log_history:
        if "loss" in record and "step" in record:
            total += record["loss"] * (record["step"] - previous)
            previous = record["step"]
    return total / previous if previous else float("nan")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def gradient_accumulation(config: TrainConfig, devices: int) -> tuple[int, int]:
    """(micro batch per device, accumulation steps) giving `config.batch_size` per step overall."""
    micro = config.micro_batch_size
    if micro is None:
        if config.batch_size % devices:
            raise UserError(
                f"--batch-size {config.batch_size} does not split over {devices} devices",
                hint="pick a batch size divisible by the number of processes",
            )
        micro = config.batch_size // devices
    if config.batch_size % (micro * devices):
        raise UserError(
            f"--batch-size {config.batch_size} is not a multiple of --micro-batch-size {micro} × "
            f"{devices} device(s)",
            hint="the effective batch must be micro-batch × devices × accumulation steps",
        )
    return micro, config.batch_size // (micro * devices)


def training_arguments(config: TrainConfig, checkpoint_dir: str) -> TrainingArguments:
    """TrainingArguments for a run (its `auto` settings already resolved: qdiablo.train.runtime);
    the checkpoints go under `checkpoint_dir`."""
    use_cpu = resolve_device(config.device).type == "cpu"
    if config.precision == "fp16" and use_cpu:
        raise UserError(
            "--precision fp16 needs a GPU: on CPU, accelerate runs fp16 as fp32 without saying so",
            hint="use --precision bf16 or fp32 on CPU",
        )
    micro, accumulation = gradient_accumulation(config, world_size())
    save = config.save_steps > 0
    checkpointing = config.gradient_checkpointing
    if fsdp.check_fsdp_launch(
        config.base, config.packed_storage, config.precision
    ):  # FSDP2: activations are recomputed, always
        checkpointing = not fsdp.fsdp_own_activation_checkpointing()
    return TrainingArguments(
        output_dir=checkpoint_dir,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.scheduler,
        warmup_steps=config.warmup,
        max_grad_norm=config.max_grad_norm,
        optim=OPTIMIZERS[config.optimizer],
        bf16=config.precision == "bf16",
        fp16=config.precision == "fp16",
        activation_checkpointing=checkpointing,
        # Non-reentrant checkpointing needs no input gradients and works under DDP.
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if save else "no",
        save_steps=config.save_steps if save else 500,
        save_total_limit=None,  # AdapterTrainer rotates: by step, keeping the user's files
        logging_nan_inf_filter=False,  # a NaN loss is an error, never averaged away
        seed=config.seed,
        use_cpu=use_cpu,
        report_to="none",
        remove_unused_columns=False,
        label_names=["labels"],
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        disable_tqdm=not config.progress,
        log_level="warning",
    )
