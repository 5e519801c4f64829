"""DiaBloConfig: which layers get diagonal blocks, how many, and in what precision."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from qdiablo.errors import UserError

# The reference's default on LLaMA-family models; other architectures: qdiablo/diablo/targets.py.
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
INDIVISIBLE_POLICIES = ("error", "pad")
BLOCK_DTYPES = ("float32", "float64", "bfloat16", "float16")


@dataclass
class DiaBloConfig:
    """Configuration of a DiaBlo adapter (docs/diablo.md).

    Each targeted linear layer `y = x Wᵀ` becomes `y = x Wᵀ + x·blockdiag(B₁…B_N)`, with the blocks
    zero-initialised, so the wrapped model starts exactly as the base.
    """

    num_blocks: int = field(
        default=64,
        metadata={
            "help": "N, the number of diagonal blocks per layer. Block i maps input slice "
            "[i·in/N, (i+1)·in/N) to output slice [i·out/N, (i+1)·out/N); a layer holds "
            "in·out/N trainable parameters."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Layers to adapt: a list of names matched against the end of each module "
            "path (e.g. 'q_proj'), a regex string matched against the whole path, or "
            "'all-linear' for every linear layer except the output head. None: the "
            "architecture's default (q,k,v,up,down on LLaMA-family models; see "
            "qdiablo/diablo/targets.py), recorded as a list in the saved adapter."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Layers never to adapt, in the same forms as target_modules."},
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={
            "help": "Only adapt layers of these decoder-block indices (the number in "
            "'.layers.<i>.' of the module path). None adapts every block."
        },
    )
    dropout: float = field(
        default=0.05,
        metadata={"help": "Dropout probability on the adapter's input only (0.05 in the paper)."},
    )
    block_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the blocks. Keep float32 even when the base runs in bf16/fp16: "
            "the input is cast once on the way in and the output once on the way out."
        },
    )
    indivisible: str = field(
        default="error",
        metadata={
            "help": "What to do when N does not divide a layer's in or out features: 'error' "
            "names the layer and the valid N nearby; 'pad' (the reference's behaviour) uses "
            "blocks of ceil(in/N) × ceil(out/N) on a zero-padded input, slicing the output."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple | set):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple | set):
            self.exclude_modules = list(self.exclude_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int):
            raise UserError(f"num_blocks must be an integer, got {self.num_blocks!r}")
        if self.num_blocks < 1:
            raise UserError(f"num_blocks must be ≥ 1, got {self.num_blocks}")
        if self.target_modules is not None and not self.target_modules:
            raise UserError("target_modules is empty: name at least one layer, or 'all-linear'")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.block_dtype not in BLOCK_DTYPES:
            raise UserError(
                f"block_dtype '{self.block_dtype}' is not supported",
                hint=f"choose from {', '.join(BLOCK_DTYPES)}",
            )
        if self.indivisible not in INDIVISIBLE_POLICIES:
            raise UserError(
                f"indivisible must be 'error' or 'pad', got {self.indivisible!r}",
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> DiaBloConfig:
        """Build from a dict, rejecting unknown keys so that typos never pass silently."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(
                f"{source}: unknown DiaBloConfig field(s): {', '.join(unknown)}",
                hint=f"known fields: {', '.join(sorted(known))}",
            )
        return cls(**data)
