"""Trainable-parameter budgets: DiaBlo's N blocks against LoRA's rank r (docs/diablo.md §4).

Over a set of adapted layers with shapes (inᵢ, outᵢ):
- DiaBlo with N blocks trains Σ inᵢ·outᵢ/N parameters (with `indivisible='pad'`, N·⌈in/N⌉·⌈out/N⌉);
- LoRA with rank r trains r·Σ(inᵢ + outᵢ).

A matched budget is r = round(Σ in·out/N ÷ Σ(in+out)); the other way round, N is the valid block
count (one that divides every layer, unless padding) whose count is nearest to LoRA's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qdiablo.diablo.layer import block_shape
from qdiablo.diablo.layer import valid_num_blocks as divisors_of_all
from qdiablo.errors import UserError

Shape = tuple[int, int]  # (in_features, out_features)


def diablo_parameters(shapes: Sequence[Shape], num_blocks: int, indivisible: str = "error") -> int:
    """Trainable parameters of DiaBlo with N blocks on these layers (N blocks of the shape
    DiaBloLinear allocates)."""
    total = 0
    for fin, fout in shapes:
        block_in, block_out = block_shape(fin, fout, num_blocks, indivisible, name=f"{fin}×{fout}")
        total += num_blocks * block_in * block_out
    return total


def lora_parameters(shapes: Sequence[Shape], rank: int) -> int:
    """Trainable parameters of LoRA with rank r on these layers (A: r×in, B: out×r; no bias)."""
    return rank * sum(fin + fout for fin, fout in shapes)


def matched_rank(shapes: Sequence[Shape], num_blocks: int, indivisible: str = "error") -> int:
    """The LoRA rank whose count is nearest DiaBlo's at N: round(Σ in·out/N ÷ Σ(in+out)), ≥ 1."""
    _check(shapes)
    per_rank = sum(fin + fout for fin, fout in shapes)
    return max(1, round(diablo_parameters(shapes, num_blocks, indivisible) / per_rank))


def valid_num_blocks(shapes: Sequence[Shape]) -> list[int]:
    """Every N that divides the in and out features of all layers."""
    _check(shapes)
    return divisors_of_all(shapes)


def matched_num_blocks(shapes: Sequence[Shape], rank: int) -> int:
    """The valid N whose DiaBlo count is nearest LoRA's count at rank r (ties: the larger N)."""
    target = lora_parameters(shapes, rank)
    candidates = valid_num_blocks(shapes)
    return min(candidates, key=lambda n: (abs(diablo_parameters(shapes, n) - target), -n))


def _check(shapes: Sequence[Shape]) -> None:
    if not shapes:
        raise UserError("no layers to count parameters over: target_modules matched nothing")


@dataclass(frozen=True)
class Budget:
    """Both methods' settings and trainable counts for a run, as recorded in its outputs.

    `num_blocks` / `rank` are the settings of the run (the run's own method trains with its own);
    `matched_rank` is LoRA's rank matching N and `matched_num_blocks` DiaBlo's N matching r (each
    method's `AdapterMethod.matched` reads the one it needs).
    """

    num_blocks: int
    rank: int
    diablo_parameters: int | None  # at num_blocks; None when N is not valid on these layers
    lora_parameters: int  # at rank
    matched_rank: int | None  # the rank whose LoRA count is nearest DiaBlo's at num_blocks
    matched_num_blocks: int  # the valid N whose DiaBlo count is nearest LoRA's at rank
    num_layers: int

    def to_dict(self) -> dict[str, int | None]:
        return {
            "num_blocks": self.num_blocks,
            "rank": self.rank,
            "diablo_trainable_parameters": self.diablo_parameters,
            "lora_trainable_parameters": self.lora_parameters,
            "matched_rank": self.matched_rank,
            "matched_num_blocks": self.matched_num_blocks,
            "num_adapted_layers": self.num_layers,
        }


def resolve_budget(
    shapes: Sequence[Shape],
    setting: str | None,
    num_blocks: int | None,
    rank: int | None,
    match_params: bool,
    indivisible: str = "error",
) -> Budget:
    """Settle N and r for a run; `setting` is the one the run's method trains with
    ("num_blocks", "rank" or None: `AdapterMethod.setting`), and an N it trains with must be valid.

    - Without `match_params`, each defaults independently (N=64; r=64, the paper's settings) and
      the run's own method uses its own setting.
    - With `match_params`, the one given (or the run's method's default) fixes the other:
      `--adapter lora --num-blocks 64 --match-params` trains LoRA at the rank matching N=64.
    """
    _check(shapes)
    if match_params:
        if num_blocks is not None and rank is not None:
            raise UserError(
                "--match-params derives one of --num-blocks / --rank from the other: give only one"
            )
        if rank is not None:
            num_blocks = matched_num_blocks(shapes, rank)
        else:
            num_blocks = 64 if num_blocks is None else num_blocks
            rank = matched_rank(shapes, num_blocks, indivisible)
    else:  # None means the default; 0 is an error below, never the default in disguise
        num_blocks = 64 if num_blocks is None else num_blocks
        rank = 64 if rank is None else rank
    if num_blocks < 1 or rank < 1:
        raise UserError(f"--num-blocks and --rank must be ≥ 1 (got N={num_blocks}, r={rank})")
    if setting == "num_blocks":
        diablo_parameters(shapes, num_blocks, indivisible)  # raises early on an invalid N
    diablo = _safe_diablo(shapes, num_blocks, indivisible)
    return Budget(
        num_blocks=num_blocks,
        rank=rank,
        diablo_parameters=diablo,
        lora_parameters=lora_parameters(shapes, rank),
        matched_rank=matched_rank(shapes, num_blocks, indivisible) if diablo is not None else None,
        matched_num_blocks=matched_num_blocks(shapes, rank),
        num_layers=len(shapes),
    )


def _safe_diablo(shapes: Sequence[Shape], num_blocks: int, indivisible: str) -> int | None:
    try:
        return diablo_parameters(shapes, num_blocks, indivisible)
    except UserError:
        return None  # only reachable for a LoRA run whose N is not valid for DiaBlo
