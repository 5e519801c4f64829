"""Hugging Face `Trainer`, set up for adapters on frozen (possibly packed) bases.

Trainer brings gradient accumulation, the schedule with warmup, clipping, mixed precision,
gradient checkpointing, logging, checkpoint rotation, resume and multi-device (accelerate: DDP on
GPUs, gloo on CPUs, or FSDP2). `AdapterTrainer` changes only what it saves and loads: the adapter,
never the frozen base (see `qdiablo.train.checkpoint`); under FSDP the gathered adapter and an
unsharded optimizer state (see `qdiablo.train.fsdp`).
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from qdiablo.adapters.registry import method_of
from qdiablo.devices import resolve_device
from qdiablo.errors import UserError
from qdiablo.optional import prepare_trainer_imports
from qdiablo.train import fsdp
from qdiablo.train.checkpoint import load_adapter_weights, save_adapter, unwrap
from qdiablo.train.config import OPTIMIZERS, TrainConfig
from qdiablo.train.distill import distillation_loss, next_token_mask

TRAINING_ARGS_NAME = "training_args.bin"
SCHEDULER_NAME = "scheduler.pt"


class AdapterTrainer(Trainer):
    """A Trainer whose checkpoints hold the adapter only, and which reloads it strictly; with
    trained scales in their own optimizer group, and optionally a distillation teacher."""

    def __init__(
        self,
        model: nn.Module,
        *args,
        load_shards=None,
        scale_lr: float | None = None,
        teacher: nn.Module | None = None,
        distill_weight: float = 1.0,
        **kwargs,
    ):
        """`load_shards(accelerator, model)`: shards a model built on the meta device and fills
        this process's shards (FSDP's sharded loading, `qdiablo.train.fsdp_loading`).
        `scale_lr`: the learning rate of trained scale multipliers (`--train-scales`);
        `teacher`: the full-precision model to distil from, `distill_weight` its loss share."""
        self.scale_lr = scale_lr
        self.teacher = teacher
        self.distill_weight = distill_weight
        method_of(model).prepare_for_trainer(model)  # Trainer's check for attached adapters
        prepare_trainer_imports()  # Trainer imports PEFT (and it bitsandbytes): quietly first
        super().__init__(model, *args, **kwargs)
        if load_shards is not None:
            self.model = self.model_wrapped = load_shards(self.accelerator, self.model)
        if teacher is not None:
            # compute_loss returns a per-micro-batch mean: let Trainer divide it by the
            # accumulation steps (the LM loss alone is normalised over the whole batch instead).
            self.loss_is_scaled_for_ga = False

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
        save_total_limit=config.save_total_limit,
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
