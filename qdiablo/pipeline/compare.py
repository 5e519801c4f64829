"""`qdiablo compare config.yaml`: methods x bits x budgets (docs/math10k.md §10).

Each grid cell is a quantize (optional) -> train -> eval chain built from the `run` stage
builders, and every stage is content-addressed: its folder and marker are named by its identity,
so identical stages are shared (one MagR+GPTQ base per bits for every method that uses it; the
DiaBlo run at N=64 is the same under both budgets), and a re-run skips what is done.

Methods (a name, quantize settings or null, train settings; `bits` limits where one applies):
QLoRA (NF4 base, 4 bits), NF2-LoRA (NF2 base, 2 bits), GPTQ-LoRA (GPTQ without MagR + LoRA) and
the reference MagR-DiaBlo (MagR + GPTQ + DiaBlo), which every other method is tested against.
MagR-DiaBlo+recon (its base with block-wise reconstruction), MagR-DiaBlo+recon+scales (the same,
with the base's scales trained alongside: `--train-scales`) and GPTQ-LoRA+recon (LoRA on that
same base) are built in but off by default: list `- name: MagR-DiaBlo+recon` under `methods` to
add one.
Seeds: `seeds: [42, 43]` trains every cell once per seed (on the same bases); the report gives
each method's mean and spread over them. A method's own `seeds` overrides the grid's.
Budgets: `matched` (LoRA's rank matched to DiaBlo's N: train's --match-params) and `paper`
(N against r, 64 and 64 by default, as the paper did; not matched).
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdiablo.adapters.registry import get_adapter
from qdiablo.errors import UserError
from qdiablo.flags import load_yaml
from qdiablo.pipeline.report import collect, write_reports
from qdiablo.pipeline.run import (
    WIRED,
    check_wiring,
    eval_stage,
    quantize_stage,
    train_stage,
)
from qdiablo.pipeline.stages import Runner, Stage, summary_table
from qdiablo.train.config import TrainConfig

log = logging.getLogger("qdiablo.pipeline")

BUDGETS = ("matched", "paper")
DEFAULT_N = 64
DEFAULT_RANK = 64
REPORT_NAMES = ("compare.md", "compare.json", "compare.png")
TOP_KEYS = (
    "output",
    "model",
    "device",
    "bits",
    "budgets",
    "seeds",
    "methods",
    "quantize",
    "train",
    "eval",
)
BUDGET_KEYS = {"num_blocks", "rank", "match_params"}
DEFAULT_METHODS: list[dict[str, Any]] = [
    {"name": "QLoRA", "bits": [4], "quantize": None, "train": {"base": "nf4", "adapter": "lora"}},
    {
        "name": "NF2-LoRA",
        "bits": [2],
        "quantize": None,
        "train": {"base": "nf2", "adapter": "lora"},
    },
    {
        "name": "GPTQ-LoRA",
        "quantize": {"method": "gptq", "magr": False},
        "train": {"adapter": "lora"},
    },
    {
        "name": "MagR-DiaBlo",
        "quantize": {"method": "gptq", "magr": True},
        "train": {"adapter": "diablo"},
        "reference": True,
    },
]
# Built in but not in the default grid: a config's `methods` turns one on by name alone.
OPTIONAL_METHODS: list[dict[str, Any]] = [
    {
        "name": "MagR-DiaBlo+recon",
        "quantize": {"method": "gptq", "magr": True, "reconstruct": True},
        "train": {"adapter": "diablo"},
    },
    {  # the base's per-group scales trained with the blocks (EfficientQAT's E2E-QP)
        "name": "MagR-DiaBlo+recon+scales",
        "quantize": {"method": "gptq", "magr": True, "reconstruct": True},
        "train": {"adapter": "diablo", "train_scales": True},
    },
    {  # LoRA on the same reconstructed base: what reconstruction alone is worth to LoRA
        "name": "GPTQ-LoRA+recon",
        "quantize": {"method": "gptq", "magr": True, "reconstruct": True},
        "train": {"adapter": "lora"},
    },
]


@dataclass
class Method:
    name: str
    quantize: dict[str, Any] | None
    train: dict[str, Any]
    bits: list[int] | None = None  # None: every bits of the grid
    reference: bool = False
    seeds: list[int] | None = None  # None: the grid's seeds


@dataclass
class Cell:
    bits: int
    budget: str
    method: Method
    base: Stage | None
    train: Stage
    eval: Stage
    seed: int | None = None  # the training seed, when the grid has `seeds`


@dataclass
class Grid:
    root: Path
    model: str
    cells: list[Cell]
    settings: dict[str, Any] = field(default_factory=dict)


def _seeds(value: Any, source: str) -> list[int] | None:
    """A `seeds` entry: None, or a non-empty list of whole numbers."""
    if value is not None and (
        not isinstance(value, list)
        or not value
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    ):
        raise UserError(f"{source}: 'seeds' must be a list of whole numbers, e.g. [42, 43]")
    return value


def _norm(d: dict | None) -> dict[str, Any]:
    return {str(k).replace("-", "_"): v for k, v in (d or {}).items()}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def parse_methods(entries: Any, source: str) -> list[Method]:
    """The default methods, with the config's entries replacing (same name), removing
    (`skip: true`) or adding methods."""
    methods = {m["name"]: copy.deepcopy(m) for m in DEFAULT_METHODS}
    optional = {m["name"]: m for m in OPTIONAL_METHODS}
    if entries is not None and not isinstance(entries, list):
        raise UserError(f"{source}: 'methods' must be a list of {{name, quantize, train}}")
    for entry in entries or []:
        if not isinstance(entry, dict) or not entry.get("name"):
            raise UserError(f"{source}: every method needs a 'name'")
        unknown = set(entry) - {"name", "bits", "quantize", "train", "reference", "skip", "seeds"}
        if unknown:
            raise UserError(
                f"{source}: method '{entry['name']}': unknown key '{sorted(unknown)[0]}'",
                hint="a method has name, bits, quantize, train, reference, skip, seeds",
            )
        if entry.get("skip"):
            methods.pop(entry["name"], None)
            continue
        builtin = methods.get(entry["name"]) or copy.deepcopy(optional.get(entry["name"], {}))
        methods[entry["name"]] = {**builtin, **entry}
    out = [
        Method(
            name=str(m["name"]),
            quantize=None if m.get("quantize") is None else _norm(m["quantize"]),
            train=_norm(m.get("train")),
            bits=None if m.get("bits") is None else [int(b) for b in m["bits"]],
            reference=bool(m.get("reference", False)),
            seeds=_seeds(m.get("seeds"), f"{source}: method '{m['name']}'"),
        )
        for m in methods.values()
    ]
    if sum(m.reference for m in out) != 1:
        raise UserError(
            f"{source}: exactly one method must be the reference (reference: true)",
            hint="MagR-DiaBlo is the default reference",
        )
    return out


def _content_address(stage: Stage, folder: Path, label: str, shared: dict[str, Stage]) -> Stage:
    """Name the stage (key and folder) by its identity; an identical stage already built is
    returned instead, so that the grid shares it."""
    key = f"{label}-{stage.identity[:10]}"
    if stage.identity in shared:
        return shared[stage.identity]
    stage.key = key
    stage.output = folder / key
    stage.args["output"] = stage.output
    stage._namespace = None  # re-resolve with the real folder (the identity does not change)
    shared[stage.identity] = stage
    return stage


def build_grid(data: dict[str, Any], source: str, output: str | None = None) -> Grid:
    """Every cell's stages, every key checked against its verb; nothing runs here."""
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise UserError(
            f"{source}: unknown key '{unknown[0]}'", hint=f"known keys: {', '.join(TOP_KEYS)}"
        )
    root = Path(output or data.get("output") or "")
    if not str(root) or str(root) == ".":
        raise UserError(f"{source}: give 'output', the folder the grid writes under")
    model = str(data.get("model") or "smollm2")
    bits_list = [int(b) for b in (data.get("bits") or [2, 4])]
    budgets = list(data.get("budgets") or BUDGETS)
    for b in budgets:
        if b not in BUDGETS:
            raise UserError(f"{source}: unknown budget '{b}'", hint=f"choose from {BUDGETS}")
    common_q, common_t, common_e = (_norm(data.get(k)) for k in ("quantize", "train", "eval"))
    check_wiring(common_q, WIRED["quantize"] | {"bits"}, f"{source} [quantize]")
    check_wiring(
        common_t,
        WIRED["train"] | {"base", "adapter", "match_params"},
        f"{source} [train]",
    )
    check_wiring(common_e, WIRED["eval"], f"{source} [eval]")
    n_blocks = int(common_t.pop("num_blocks", DEFAULT_N))
    rank = int(common_t.pop("rank", DEFAULT_RANK))
    methods = parse_methods(data.get("methods"), source)
    seeds = _seeds(data.get("seeds"), source)

    shared: dict[str, Stage] = {}
    cells: list[Cell] = []
    for bits in bits_list:
        for method in methods:
            if method.bits is not None and bits not in method.bits:
                continue
            where = f"{source} [method {method.name}]"
            base = None
            if method.quantize is not None:
                check_wiring(method.quantize, WIRED["quantize"] | {"bits"}, where)
                q = {**common_q, **method.quantize, "bits": bits}
                base = quantize_stage("quantize", model, q, root / "tmp", where)
                kind = f"{q.get('method', 'gptq')}{'-magr' if q.get('magr') else ''}"
                kind += "-recon" if q.get("reconstruct") else ""
                base = _content_address(base, root / "bases", f"base-w{bits}-{kind}", shared)
            check_wiring(method.train, WIRED["train"] | BUDGET_KEYS, where)
            own = method.seeds or seeds or [None]
            for budget in budgets:
                for seed in own:
                    cells.append(
                        _cell(
                            bits, budget, method, base, seed, common_t, common_e, n_blocks, rank,
                            root, model, where, shared, first=seed == own[0],
                        )
                    )  # fmt: skip
    if not cells:
        raise UserError(f"{source}: the grid is empty", hint="check bits and the methods' bits")
    settings = {
        "bits": bits_list,
        "budgets": budgets,
        "seeds": seeds,
        "num_blocks": n_blocks,
        "paper_rank": rank,
        "quantize": common_q,
        "train": common_t,
        "eval": common_e,
        "methods": [m.__dict__ for m in methods],
    }
    return Grid(root, model, cells, settings)


def _cell(
    bits: int,
    budget: str,
    method: Method,
    base: Stage | None,
    seed: int | None,
    common_t: dict,
    common_e: dict,
    n_blocks: int,
    rank: int,
    root: Path,
    model: str,
    where: str,
    shared: dict[str, Stage],
    first: bool,
) -> Cell:
    """One cell's train and eval stages (content-addressed: identical ones are shared)."""
    t = {**common_t, **method.train}
    if seed is not None:
        t["seed"] = seed
    adapter = get_adapter(t.get("adapter", TrainConfig.adapter))
    t.update(adapter.compare_settings(budget, n_blocks, rank))
    label = f"{_slug(method.name)}-w{bits}" + ("" if seed is None else f"-s{seed}")
    train = train_stage("train", base, model, t, root / "tmp", where)
    train = _content_address(train, root / "train", f"train-{label}", shared)
    ev = eval_stage("eval", base, train, model, dict(common_e), root / "tmp", where)
    ev = _content_address(ev, root / "eval", f"eval-{label}", shared)
    if seed is not None and not first:  # another seed of the method: its own row, not the reference
        method = Method(f"{method.name} (seed {seed})", method.quantize, method.train, method.bits)
    return Cell(bits, budget, method, base, train, ev, seed)


def run_compare(
    config: str | Path,
    force: list[str] | None = None,
    output: str | None = None,
    isolate: bool = True,
    overwrite: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) the grid, then write compare.md, compare.json and compare.png. With
    `isolate` every stage runs in its own process, so each training's peak memory is its own.
    `device` (else the config's `device`, else auto) goes to every stage that takes one."""
    data = load_yaml(config)
    grid = build_grid(data, str(config), output)
    device = str(device or data.get("device") or "auto")
    stages = {s.key for c in grid.cells for s in (c.base, c.train, c.eval) if s}
    log.info("compare: %d cells, %d distinct stages", len(grid.cells), len(stages))
    for f in force or []:
        if f not in stages and f not in ("quantize", "train", "eval"):
            raise UserError(
                f"--force {f}: not a stage kind (quantize, train, eval) nor a stage key",
                hint=f"stage keys are the names in {grid.root / 'stages'}",
            )
    runner = Runner(
        grid.root, force or [], isolate=isolate, verb="compare", overwrite=overwrite, device=device
    )
    written: dict[str, Any] = {}

    def reports() -> None:
        written["results"] = collect(grid)
        written["paths"] = write_reports(grid.root, written["results"])

    runner.run([c.eval for c in grid.cells], after=reports, reports=REPORT_NAMES)
    results, paths = written["results"], written["paths"]
    print(summary_table(runner.outcomes))
    print(paths["md"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return results
