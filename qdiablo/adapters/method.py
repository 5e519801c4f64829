"""`AdapterMethod`: everything qdiablo needs to know about one adapter method, in one object.

An adapter method (DiaBlo, PEFT LoRA, or a new one) subclasses `AdapterMethod`, fills in what it
does differently, and registers an instance (`qdiablo.adapters.registry.register_adapter`).
Training, checkpoints, FSDP's sharded loading, loading a saved folder, merging for
`export --merged`, the model card, the compare grid and the memory planner all ask the method
instead of branching on its name. The defaults suit an adapter that wraps its target layers in a
model with `get_base_model()` (as PEFT and DiaBlo do), saves with `save_pretrained` and does not
merge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # torch stays unimported until a method is used (the CLI's flags are light)
    import torch
    from torch import nn

    from qdiablo.adapters.budget import Budget, Shape


class AdapterMethod:
    """One adapter method; subclasses override what differs (see the module docstring)."""

    name: ClassVar[str]  # the `--adapter` value and the registry key
    title: ClassVar[str]  # how cards and logs name it ("DiaBlo", "LoRA")
    config_class: ClassVar[type]  # its configuration dataclass
    default_lr: ClassVar[float]  # `--lr`'s default for it
    # The budget setting it trains with: "num_blocks" (N), "rank" (r) or None (neither).
    setting: ClassVar[str | None] = None
    mergeable: ClassVar[bool] = False  # whether `merged_layer` folds it into a dense weight
    library_name: ClassVar[str | None] = None  # the model card's library_name (who loads it)

    # ---- training ---------------------------------------------------------------------------

    def check(self, shapes: Mapping[str, Shape], config: Any) -> None:
        """Refuse settings it cannot train on these layers (name → (in, out)), before the
        budget is settled; `config` is the TrainConfig."""

    def trainable_count(self, shapes: Sequence[Shape], budget: Budget) -> int:
        """Its trainable parameters at `budget` on these layers (checked against the model)."""
        raise NotImplementedError

    def matched(self, budget: Budget, shapes: Sequence[Shape]) -> dict[str, Any] | None:
        """The other method at the setting matching this one's count (train_results.json's
        `other_method`), or None when it has no matched counterpart."""
        return None

    def describe(self, num_blocks: int | None, rank: int | None) -> str:
        """Its setting in a log or plan line, e.g. "N=64"."""
        return ""

    def compare_settings(self, budget: str, num_blocks: int, rank: int) -> dict[str, Any]:
        """Its train settings in a `qdiablo compare` cell: under the `matched` budget it trains
        at DiaBlo's count at N (a method set by its rank derives it: --match-params), under
        `paper` at its own setting."""
        if self.setting == "rank":
            if budget == "matched":
                return {"num_blocks": num_blocks, "match_params": True}
            return {"rank": rank}
        return {"num_blocks": num_blocks}

    def attach(self, model: nn.Module, targets: list[str] | str, budget: Budget, config: Any):
        """Freeze the base and wrap the target layers with a freshly initialised adapter."""
        raise NotImplementedError

    def prepare_for_trainer(self, model: nn.Module) -> None:
        """Make Hugging Face Trainer accept the model: Trainer refuses a quantized model
        "without trainable adapters" unless PEFT's flag says adapters are attached."""
        model._hf_peft_config_loaded = True

    # ---- the live model ---------------------------------------------------------------------

    def owns(self, model: nn.Module) -> bool:
        """Whether `model` is a model this method's `attach` or `load` returned."""
        raise NotImplementedError

    def base_model(self, model: nn.Module) -> nn.Module:
        """The wrapped base model."""
        return model.get_base_model()

    def save(
        self, model: nn.Module, folder: Path, gathered: dict[str, torch.Tensor] | None
    ) -> None:
        """Write the adapter folder; `gathered`: the trainable parameters in full by name, when
        FSDP shards the model."""
        raise NotImplementedError

    def load_weights(self, model: nn.Module, folder: Path) -> None:
        """Copy a saved adapter's weights into the live model, strictly (resuming)."""
        raise NotImplementedError

    def refresh_fingerprint(self, model: nn.Module, folder: Path) -> None:
        """Record in the saved adapter `folder` the fingerprint of the base `model` holds now
        (export folds trained scales into it). Nothing to do without a fingerprint."""

    # ---- FSDP's sharded loading (qdiablo.train.fsdp_loading) ----------------------------------

    def fingerprint_from_files(self, model: nn.Module, state_of: Any) -> None:
        """Record the base's fingerprint when the base is still on the meta device: `state_of`
        reads the sampled elements from the files. Nothing to do without a fingerprint."""

    def initial_value(self, name: str, param: torch.Tensor, seed: int) -> torch.Tensor:
        """The full initial value of trainable parameter `name`, the same at any world size."""
        import torch

        return torch.zeros(param.shape, dtype=torch.float32)

    def base_key(self, param_name: str) -> str:
        """The checkpoint key of a frozen base parameter inside the adapted model."""
        for prefix in ("base_model.model.", "model."):
            if param_name.startswith(prefix):
                param_name = param_name[len(prefix) :]
                break
        return param_name.replace(".base_layer.", ".")

    def is_adapter_tensor(self, name: str) -> bool:
        """Whether a module name belongs to the adapter itself rather than the base."""
        return False

    # ---- a saved folder ---------------------------------------------------------------------

    def recognizes(self, config: Mapping[str, Any]) -> str | None:
        """The kind this folder's adapter_config.json describes (its name, or PEFT's type), or
        None when it is not one of this method's folders."""
        raise NotImplementedError

    def load(self, model: nn.Module, folder: Path, kind: str, *, force: bool = False):
        """Attach the saved adapter in `folder` to a loaded base (`force`: skip a fingerprint
        check, where there is one)."""
        raise NotImplementedError

    # ---- export -----------------------------------------------------------------------------

    def merged_layer(self, module: nn.Module, dtype: torch.dtype) -> nn.Module | None:
        """For one of its layers, a plain `nn.Linear` holding the adapted weight (computed in
        float32, cast once to `dtype`); None for any other module."""
        return None

    def merge_and_unload(self, model: nn.Module, dtype: torch.dtype) -> nn.Module:
        """The base with each adapted layer replaced by `merged_layer`."""
        base = self.base_model(model)
        for name, module in list(base.named_modules()):
            merged = self.merged_layer(module, dtype)
            if merged is not None:
                base.set_submodule(name, merged)
        return base

    def card_lines(self, kind: str, config: Mapping[str, Any]) -> list[str]:
        """The model card's "Adapter" section, from the folder's adapter_config.json."""
        return [f"- {self.card_title(kind)}: {dict(config)}"]

    def card_title(self, kind: str) -> str:
        """How the card's title names the adapter."""
        return self.title

    # ---- the memory planner (qdiablo.memory) --------------------------------------------------

    def plan_attach(self, model: nn.Module, num_blocks: int, targets: list[str] | str | None):
        """The planner's model on the meta device with the adapter attached, when its
        parameters are counted from the model (the default: nothing attached)."""
        return model

    def plan_state_bytes(
        self, shapes: Sequence[Shape], num_blocks: int, rank: int, ranks: int
    ) -> float | None:
        """Bytes per process of its trainable state (fp32 parameters, gradients, two AdamW
        moments), when not counted from `plan_attach`'s model; None: counted there."""
        return None

    def activation_bytes_per_layer(
        self,
        per_block: Sequence[Any],
        inputs: Mapping[str, int],
        dropout: float,
        rank: int,
        compute_bytes: int,
    ) -> int:
        """Bytes per token and decoder layer its layers save for the backward pass:
        `per_block` holds the adapted layers of a block (name, in_features, out_features),
        `inputs` the bytes per token of each distinct input they read (layers sharing an input
        share it: qdiablo.memory.activations)."""
        return 0
