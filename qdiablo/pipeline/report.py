"""`qdiablo compare`'s outputs: compare.json (everything), compare.md (the table a reader needs
to tell a real gap from noise) and compare.png (the paper-style grouped bar chart)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eval.report import read_jsonl
from eval.runner import safe_name
from qdiablo.data import EVAL_SETS
from qdiablo.io import read_json, write_json, write_text
from qdiablo.pipeline.stats import discordant_pairs, mcnemar_exact, mean_interval, wilson_interval

if TYPE_CHECKING:
    from qdiablo.pipeline.compare import Cell, Grid


def _items(eval_dir: Path, task: str) -> dict[tuple[str, int], bool]:
    """(task, index) -> correct, from the eval's per-example JSON Lines."""
    rows = read_jsonl(eval_dir / f"{safe_name(task)}.jsonl", repair=False)
    return {(task, int(r["index"])): bool(r["correct"]) for r in rows}


def _cell_result(cell: Cell) -> dict[str, Any]:
    summary = read_json(cell.eval.output / "summary.json", what="evaluation summary")
    train = read_json(cell.train.output / "train_results.json", what="training results")
    tasks = {}
    order = {t: i for i, t in enumerate(EVAL_SETS)}
    for name, t in sorted(summary["tasks"].items(), key=lambda kv: order.get(kv[0], 99)):
        if t.get("n") is None:
            continue
        lo, hi = wilson_interval(t["correct"], t["n"])
        tasks[name] = {
            "correct": t["correct"],
            "n": t["n"],
            "accuracy": t["correct"] / t["n"] if t["n"] else None,
            "ci95": [lo, hi],
            "nll": t.get("nll"),
        }
    main = [t for t in EVAL_SETS if t in tasks] or list(tasks)
    counts = [(tasks[t]["correct"], tasks[t]["n"]) for t in main]
    mean = sum(k / n for k, n in counts if n) / len(counts) if counts else None
    nlls = [tasks[t]["nll"] for t in main if tasks[t]["nll"] is not None]
    throughput = train.get("throughput") or {}
    return {
        "bits": cell.bits,
        "budget": cell.budget,
        "method": cell.method.name,
        "seed": cell.seed,
        "group": re.sub(r" \(seed \d+\)$", "", cell.method.name),
        "reference": cell.method.reference,
        "base": cell.base.output.name if cell.base else train.get("base"),
        "train_dir": str(cell.train.output),
        "eval_dir": str(cell.eval.output),
        "adapter": train.get("adapter"),
        "trainable_parameters": train.get("trainable_parameters"),
        "budget_detail": train.get("budget"),
        "train_seconds": train.get("train_runtime_seconds"),
        "peak_rss_bytes": throughput.get("peak_rss_bytes"),
        "cuda_peak_bytes": throughput.get("cuda_peak_bytes"),
        "global_step": train.get("global_step"),
        "records": (train.get("data") or {}),
        "tasks": tasks,
        "mean_tasks": main,
        "mean": {"accuracy": mean, "ci95": list(mean_interval(counts)) if counts else None},
        "nll": sum(nlls) / len(nlls) if nlls and len(nlls) == len(main) else None,
    }


def collect(grid: Grid) -> dict[str, Any]:
    """Every cell's scores, intervals and costs, and each baseline's McNemar test against the
    reference method at the same bits and budget, pooled over the mean's tasks."""
    rows = [_cell_result(c) for c in grid.cells]
    by_cell = {(r["bits"], r["budget"], r["method"]): (r, c) for r, c in zip(rows, grid.cells)}
    for r, cell in zip(rows, grid.cells):
        r["mcnemar"] = None
        if cell.method.reference:
            continue
        ref = next(
            (
                (rr, cc)
                for (b, bud, _), (rr, cc) in by_cell.items()
                if b == r["bits"] and bud == r["budget"] and cc.method.reference
            ),
            None,
        )
        if ref is None:
            continue
        tasks = [t for t in r["mean_tasks"] if t in ref[0]["tasks"]]
        mine: dict = {}
        theirs: dict = {}
        for t in tasks:
            mine.update(_items(cell.eval.output, t))
            theirs.update(_items(ref[1].eval.output, t))
        b, c, n = discordant_pairs(mine, theirs)
        r["mcnemar"] = {
            "versus": ref[0]["method"],
            "tasks": tasks,
            "items": n,
            "b": b,  # this method right, the reference wrong
            "c": c,  # the reference right, this method wrong
            "p_value": mcnemar_exact(b, c),
        }
    first_train = read_json(grid.cells[0].train.output / "train_config.json", what="train config")
    first_eval = read_json(grid.cells[0].eval.output / "summary.json", what="eval summary")
    header = {
        "model": grid.model,
        "data": first_train.get("data") or "shipped Math10K subset (qdiablo/resources/math10k)",
        "decontaminate": first_train.get("decontaminate"),
        "records": rows[0]["records"],
        "max_records": first_train.get("max_records"),
        "max_steps": first_train.get("max_steps"),
        "epochs": first_train.get("epochs"),
        "eval_settings": first_eval.get("settings"),
        "eval_tasks": {t: v["n"] for t, v in rows[0]["tasks"].items()},
    }
    return {"header": header, "grid": grid.settings, "rows": rows}


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _records(data: dict[str, Any]) -> str:
    if not data:
        return "records: unknown"
    return (
        f"{data.get('examples')} training examples from {data.get('records')} records "
        f"({data.get('dropped')} dropped by decontamination)"
    )


def _num(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _acc(a: float | None, ci: list[float] | None) -> str:
    if a is None:
        return "—"
    return f"{_pct(a)} [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else _pct(a)


def markdown(results: dict[str, Any]) -> str:
    h = results["header"]
    rows = results["rows"]
    tasks = list(rows[0]["tasks"])
    settings = h.get("eval_settings") or {}
    lines = [
        "# qdiablo compare",
        "",
        f"- model: `{h['model']}`",
        f"- training data: {h['data']} (decontaminated against: {h['decontaminate']}); "
        f"{_records(h['records'])}; max_records {h['max_records']}, max_steps "
        f"{h['max_steps']}, epochs {h['epochs']}",
        f"- eval: {', '.join(f'{t} (n={n})' for t, n in h['eval_tasks'].items())}; preset "
        f"`{settings.get('preset')}`, {settings.get('max_new_tokens')} new tokens, "
        f"first {settings.get('limit') or 'all'} items of each set",
        "- accuracy % with its 95% Wilson interval; mean = unweighted mean of "
        f"{', '.join(rows[0]['mean_tasks'])} (normal interval, Agresti–Coull-adjusted "
        "variances); NLL = mean reference-response NLL (nats/token) over those tasks",
        "- McNemar: exact test vs the reference at the same bits and budget on the same items, "
        "pooled over the mean's tasks; b = this method right and the reference wrong, c = the "
        "reverse; peak memory is the training process's peak RSS",
        "",
        "| bits | budget | method | "
        + " | ".join(tasks)
        + " | mean | NLL | trainable | train s | peak MiB | McNemar b / c / p |",
        "|---:|---|---|" + "---:|" * len(tasks) + "---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        m = r["mcnemar"]
        test = "reference" if r["reference"] else "—"
        if m:
            test = f"{m['b']} / {m['c']} / {m['p_value']:.3g}"
        peak = r["peak_rss_bytes"]
        lines.append(
            f"| {r['bits']} | {r['budget']} | {r['method']} | "
            + " | ".join(_acc(r["tasks"][t]["accuracy"], r["tasks"][t]["ci95"]) for t in tasks)
            + f" | {_acc(r['mean']['accuracy'], r['mean']['ci95'])}"
            + f" | {_num(r['nll'], '.4f')}"
            + f" | {_num(r['trainable_parameters'], ',')}"
            + f" | {_num(r['train_seconds'], '.0f')}"
            + f" | {_num(peak / 2**20 if peak else None, '.0f')}"
            + f" | {test} |"
        )
    return "\n".join(lines + seed_spread(rows)) + "\n"


def seed_spread(rows: list[dict[str, Any]]) -> list[str]:
    """Lines of a table of each method's mean NLL over its seeds and their spread (max − min),
    for the grids trained with `seeds` (none otherwise)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("seed") is not None:
            groups.setdefault((r["bits"], r["budget"], r["group"]), []).append(r)
    if not groups:
        return []
    lines = [
        "",
        "Over the training seeds (same bases): mean NLL, and the spread (max − min) of the mean "
        "NLL and of each task's NLL",
        "",
        "| bits | budget | method | seeds | mean NLL | spread | largest task spread |",
        "|---:|---|---|---|---:|---:|---:|",
    ]
    for (bits, budget, name), group in groups.items():
        nlls = [r["nll"] for r in group if r["nll"] is not None]
        if not nlls:
            continue
        tasks = [
            t for t in group[0]["tasks"] if all(r["tasks"][t]["nll"] is not None for r in group)
        ]
        task_spread = max(
            (
                max(r["tasks"][t]["nll"] for r in group) - min(r["tasks"][t]["nll"] for r in group)
                for t in tasks
            ),
            default=None,
        )
        lines.append(
            f"| {bits} | {budget} | {name} | {', '.join(str(r['seed']) for r in group)} | "
            f"{sum(nlls) / len(nlls):.4f} | {max(nlls) - min(nlls):.4f} | "
            f"{_num(task_spread, '.4f')} |"
        )
    return lines


def figure(results: dict[str, Any], path: Path) -> None:
    """One panel per bits; groups = tasks + mean; one bar per method (and budget where the
    budgets differ); error bars = the 95% intervals."""
    import matplotlib  # deferred: optional and slow, only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    bits_list = sorted({r["bits"] for r in rows})
    tasks = list(rows[0]["tasks"])
    groups = [*tasks, "mean"]
    fig, axes = plt.subplots(
        1,
        len(bits_list),
        figsize=(max(5.0, 1.8 * len(groups)) * len(bits_list), 4.5),
        squeeze=False,
        sharey=True,
    )
    for ax, bits in zip(axes[0], bits_list):
        seen: dict[str, dict] = {}
        for r in rows:
            if r["bits"] != bits:
                continue
            label = r["method"] if r["reference"] else f"{r['method']} ({r['budget']})"
            seen.setdefault(r["eval_dir"], {"label": label, "row": r})
        bars = list(seen.values())
        width = 0.8 / max(1, len(bars))
        for i, bar in enumerate(bars):
            r = bar["row"]
            stats = [r["tasks"][t] for t in tasks] + [r["mean"]]
            heights = [100 * (s["accuracy"] or 0.0) for s in stats]
            cis = [s["ci95"] or [h / 100, h / 100] for h, s in zip(heights, stats)]
            lo = [max(0.0, h - 100 * ci[0]) for h, ci in zip(heights, cis)]
            hi = [max(0.0, 100 * ci[1] - h) for h, ci in zip(heights, cis)]
            xs = [g + (i - (len(bars) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(xs, heights, width, yerr=[lo, hi], capsize=2, label=bar["label"])
        ax.set_xticks(range(len(groups)), groups)
        ax.set_title(f"{bits}-bit")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("accuracy % (95% interval)")
    for ax in axes[0]:  # each panel has its own methods (NF2-LoRA at 2 bits, QLoRA at 4)
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(root: Path, results: dict[str, Any]) -> dict[str, Path]:
    paths = {"md": root / "compare.md", "json": root / "compare.json", "png": root / "compare.png"}
    write_json(paths["json"], results)
    write_text(paths["md"], markdown(results))
    figure(results, paths["png"])
    return paths
