"""`qdiablo run config.yaml`: quantize -> train -> eval -> export in one go, resumable.

The config names the output root and the model, then one mapping per stage whose keys are that
verb's long flags (`num_blocks` or `num-blocks`). A stage that is absent or `null` is left out.
The pipeline wires the folders itself (OUT/quantized, OUT/train, OUT/eval, OUT/export), so a user
key that would rewire them is an error, as is any unknown key: all checked before anything runs.
The stage builders here are shared with `qdiablo compare`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qdiablo.errors import UserError
from qdiablo.flags import load_yaml
from qdiablo.io import read_json
from qdiablo.kinds import PACKED_KINDS
from qdiablo.pipeline.stages import Outcome, Runner, Stage, summary_table
from qdiablo.train.checkpoint import latest_checkpoint

log = logging.getLogger("qdiablo.pipeline")

STAGE_NAMES = ("quantize", "train", "eval", "export")
# Flags each stage's wiring sets; a user key among them is a conflict.
WIRED = {
    "quantize": {"model", "output", "overwrite"},
    "train": {"model", "output", "resume", "overwrite"},
    "eval": {"model", "adapter", "output", "quant", "overwrite"},
    "export": {"base", "adapter", "output", "train_run", "eval", "overwrite", "verify"},
}
NF_BASES = ("nf4", "nf2")  # quantized on load by both train and eval


def stage_settings(data: dict[str, Any], name: str, source: str) -> dict[str, Any] | None:
    """A stage's mapping from the config (None when left out), keys normalised to `_`."""
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise UserError(f"{source}: '{name}' must be a mapping of `qdiablo {name}` flags or null")
    return {str(k).replace("-", "_"): v for k, v in value.items()}


def check_wiring(settings: dict[str, Any], wired: set[str], source: str) -> None:
    """Refuse user keys that the pipeline sets itself."""
    clash = sorted(k for k in settings if k in wired)
    if clash:
        raise UserError(
            f"{source}: {', '.join(repr(k) for k in clash)} is set by the pipeline",
            hint=f"the pipeline wires {', '.join(sorted(wired))} itself; remove the key",
        )


# --------------------------------------------------------------------------------------------
# Stage builders (shared with compare)
# --------------------------------------------------------------------------------------------


def _quantize_resume(output: Path) -> dict[str, Any] | None:
    """An interrupted quantize resumes from the blocks it saved (quantizers/resume.py)."""
    from quantizers.resume import PARTIAL_DIR

    return {} if (output / PARTIAL_DIR).is_dir() else None


def quantize_stage(key: str, model: str, settings: dict, output: Path, source: str) -> Stage:
    return Stage(
        key=key,
        verb="quantize",
        args={**settings, "model": model, "output": output},
        output=output,
        done_file="quantize_config.json",
        source=source,
        resume=_quantize_resume,
    )


def _train_resume(output: Path) -> dict[str, Any] | None:
    return {"resume": "auto"} if latest_checkpoint(output / "checkpoints") else None


def train_stage(
    key: str, base: Stage | None, model: str, settings: dict, output: Path, source: str
) -> Stage:
    args = {**settings, "output": output}
    if base is not None:
        if "base" in settings:
            raise UserError(
                f"{source}: 'base' is set by the pipeline (the quantize stage's method)",
                hint="remove train's 'base', or leave out the quantize stage",
            )
        args.update(model=base.output, base=base.namespace().method)
    else:
        args["model"] = model
    stage = Stage(
        key=key,
        verb="train",
        args=args,
        output=output,
        done_file="adapter/adapter_config.json",
        deps=[base] if base else [],
        path_keys=frozenset({"model"}) if base else frozenset(),
        source=source,
        resume=_train_resume,
    )
    if base is None and stage.namespace().base in PACKED_KINDS:
        raise UserError(
            f"{source}: base '{stage.namespace().base}' needs a quantize stage",
            hint="add a quantize stage, or use base fp, nf4 or nf2",
        )
    return stage


def eval_stage(
    key: str,
    base: Stage | None,
    train: Stage | None,
    model: str,
    settings: dict,
    output: Path,
    source: str,
) -> Stage:
    args: dict[str, Any] = {**settings, "output": output}
    path_keys = {"adapter"}
    if base is not None:
        args["model"] = base.output
        path_keys.add("model")
    else:
        args["model"] = model
        kind = train.namespace().base if train is not None else "fp"
        args["quant"] = kind if kind in NF_BASES else "none"
    if train is not None:
        args["adapter"] = train.output / "adapter"
    return Stage(
        key=key,
        verb="eval",
        args=args,
        output=output,
        done_file="summary.json",
        deps=[s for s in (base, train) if s is not None],
        path_keys=frozenset(path_keys),
        source=source,
        resume=lambda _: {},  # eval resumes from its finished items by itself
    )


def export_stage(
    key: str,
    base: Stage,
    train: Stage,
    evals: list[Stage],
    settings: dict,
    output: Path,
    source: str,
) -> Stage:
    args: dict[str, Any] = {
        **settings,
        "base": base.output,
        "adapter": train.output / "adapter",
        "train_run": train.output,
        "output": output,
    }
    if evals:
        args["eval"] = [e.output for e in evals]
    return Stage(
        key=key,
        verb="export",
        args=args,
        output=output,
        deps=[base, train, *evals],
        path_keys=frozenset({"base", "adapter", "train_run", "eval"}),
        source=source,
    )


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


def build_pipeline(
    data: dict[str, Any], source: str, output: str | None = None
) -> tuple[Path, list[Stage]]:
    """The output root and the configured stages, every key checked (nothing runs here)."""
    unknown = sorted(set(data) - {"output", "model", "device", *STAGE_NAMES})
    if unknown:
        raise UserError(
            f"{source}: unknown key '{unknown[0]}'",
            hint=f"known keys: output, model, device, {', '.join(STAGE_NAMES)}",
        )
    root = Path(output or data.get("output") or "")
    if not str(root) or str(root) == ".":
        raise UserError(f"{source}: give 'output', the folder every stage writes under")
    model = str(data.get("model") or "smollm2")
    settings = {n: stage_settings(data, n, source) for n in STAGE_NAMES}
    for name, values in settings.items():
        if values is not None:
            check_wiring(values, WIRED[name], f"{source} [{name}]")
    if not any(v is not None for v in settings.values()):
        raise UserError(f"{source}: no stage configured", hint=f"add {', '.join(STAGE_NAMES)}")

    stages: list[Stage] = []
    base = train = ev = None
    if settings["quantize"] is not None:
        base = quantize_stage(
            "quantize", model, settings["quantize"], root / "quantized", f"{source} [quantize]"
        )
        stages.append(base)
    if settings["train"] is not None:
        train = train_stage(
            "train", base, model, settings["train"], root / "train", f"{source} [train]"
        )
        stages.append(train)
    if settings["eval"] is not None:
        ev = eval_stage(
            "eval", base, train, model, settings["eval"], root / "eval", f"{source} [eval]"
        )
        stages.append(ev)
    if settings["export"] is not None:
        if base is None or train is None:
            raise UserError(
                f"{source} [export]: export needs a quantize and a train stage",
                hint="it packs the quantized base with the trained adapter",
            )
        stages.append(
            export_stage(
                "export",
                base,
                train,
                [ev] if ev else [],
                settings["export"],
                root / "export",
                f"{source} [export]",
            )
        )
    for s in stages:  # every stage's keys checked against its verb before any stage runs
        s.namespace()
    return root, stages


def run_pipeline(
    config: str | Path,
    force: list[str] | None = None,
    output: str | None = None,
    isolate: bool = False,
    overwrite: bool = False,
    device: str | None = None,
) -> list[Outcome]:
    """Run (or resume) the pipeline a config describes; print the summary and the scores.
    `device` (else the config's `device`, else auto) goes to every stage that takes one."""
    data = load_yaml(config)
    root, stages = build_pipeline(data, str(config), output)
    device = str(device or data.get("device") or "auto")
    names = {s.key for s in stages}
    for f in force or []:
        if f not in names:
            raise UserError(
                f"--force {f}: no such stage in {config}", hint=f"stages: {', '.join(names)}"
            )
    # --force STAGE re-runs that stage; the stages after it follow (their inputs changed).
    runner = Runner(root, force or [], isolate=isolate, overwrite=overwrite, device=device)
    outcomes = runner.run(stages)
    print(summary_table(outcomes))
    ev = next((s for s in stages if s.verb == "eval"), None)
    if ev is not None:
        print(scores_text(ev.output))
    return outcomes


def scores_text(eval_dir: Path) -> str:
    """One line per task (accuracy, NLL) and the 4-task mean, from an eval's summary.json."""
    summary = read_json(Path(eval_dir) / "summary.json", what="evaluation summary")
    lines = ["eval scores:"]
    for name, t in summary.get("tasks", {}).items():
        acc = t.get("accuracy")
        nll = t.get("nll")
        lines.append(
            f"  {name}: "
            + (f"accuracy {acc:.1f}% ({t['correct']}/{t['n']})" if acc is not None else "—")
            + (f", NLL {nll:.4f}" if nll is not None else "")
        )
    mean = summary.get("mean") or {}
    if mean.get("accuracy") is not None:
        lines.append(f"  mean of {len(mean['tasks'])} tasks: {mean['accuracy']:.1f}%")
    return "\n".join(lines)
