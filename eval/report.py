"""Evaluation outputs: per-example JSON Lines (resumable), the summary JSON and a Markdown table.

JSON Lines files are append-only: each finished batch is appended and flushed to disk, so an
interrupted run leaves every finished example on disk, plus at most one partially written last
line. `read_jsonl` drops such a line (and cuts it off the file) so that the run resumes cleanly.
The summary and the Markdown table are written atomically (`qdiablo.io`).

Accuracies are percentages (0-100). NLLs are in nats per token.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from qdiablo.errors import UserError

log = logging.getLogger(__name__)


def append_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append rows as JSON lines and force them to disk."""
    text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows)
    if not text:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike, repair: bool = True) -> list[dict[str, Any]]:
    """Read a JSON Lines file written by `append_jsonl`; a missing file reads as empty.

    A last line that is incomplete (no newline, or not valid JSON) is what an interrupted write
    leaves: it is dropped, and with `repair` cut off the file. A bad line anywhere else is a
    UserError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    rows: list[dict[str, Any]] = []
    good_end = 0
    pos = 0
    lineno = 0
    while pos < len(data):
        lineno += 1
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        line = data[pos:end]
        last = end >= len(data)
        try:
            if nl < 0:
                raise ValueError("no newline")
            text = line.decode("utf-8").strip()
            row = json.loads(text) if text else None
            if row is not None and not isinstance(row, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError) as e:
            if last:
                log.warning(
                    "%s: dropping a partially written last line (%d bytes)", path, len(line)
                )
                break
            raise UserError(
                f"{path}: line {lineno} is not a valid record ({e})",
                hint="the file is corrupted: delete it (its examples are redone), or use "
                "--overwrite",
            ) from e
        if row is not None:
            rows.append(row)
        good_end = end
        pos = end
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return rows


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _pct(correct: int, n: int) -> float | None:
    return 100.0 * correct / n if n else None


def task_summary(
    *,
    group: str,
    kind: str,
    source: str,
    scores: Sequence[Mapping[str, Any]] | None,
    nll: Mapping[str, Any] | None,
    n_total: int,
) -> dict[str, Any]:
    """One task's line of the summary: accuracy (and AQuA's strict accuracy), NLL and counts."""
    out: dict[str, Any] = {"group": group, "kind": kind, "source": source, "n_total": n_total}
    if scores is not None:
        n = len(scores)
        correct = sum(bool(s["correct"]) for s in scores)
        out.update(
            n=n,
            correct=correct,
            accuracy=_pct(correct, n),
            no_answer=sum(s["extracted"] is None for s in scores),
            stopped_at_length=sum(s.get("stopped") == "length" for s in scores),
        )
        if kind == "letter":
            strict = sum(bool(s.get("correct_strict")) for s in scores)
            out.update(correct_strict=strict, accuracy_strict=_pct(strict, n))
    if nll is not None:
        out.update(
            nll_n=nll["n"],
            nll=_finite(nll["nll"]),
            ppl=_finite(nll["ppl"]),
            nll_tokens=nll["tokens"],
        )
        if nll.get("nonfinite"):  # examples whose NLL is NaN/inf: the task has no NLL
            out["nll_nonfinite"] = nll["nonfinite"]
    return out


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def mean_summary(tasks: Mapping[str, Mapping[str, Any]], main_sets: Sequence[str]):
    """The unweighted mean over the main sets present (complete when all four are)."""
    present = [t for t in main_sets if t in tasks]
    acc = [tasks[t]["accuracy"] for t in present if tasks[t].get("accuracy") is not None]
    strict = [
        tasks[t].get("accuracy_strict", tasks[t].get("accuracy"))
        for t in present
        if tasks[t].get("accuracy") is not None
    ]
    nll = [tasks[t]["nll"] for t in present if tasks[t].get("nll") is not None]
    return {
        "tasks": present,
        "complete": len(present) == len(main_sets),
        "accuracy": sum(acc) / len(acc) if acc and len(acc) == len(present) else None,
        "accuracy_strict": (
            sum(strict) / len(strict) if strict and len(strict) == len(present) else None
        ),
        "nll": sum(nll) / len(nll) if nll and len(nll) == len(present) else None,
    }


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _fmt(x: Any, digits: int) -> str:
    if x is None:
        return "—"
    return f"{x:.{digits}f}"


def _row(name: str, t: Mapping[str, Any]) -> str:
    n = t.get("n", t.get("nll_n", 0))
    acc = _fmt(t.get("accuracy"), 1)
    if t.get("accuracy") is not None:
        acc = f"{acc} ({t['correct']}/{t['n']})"
    strict = _fmt(t.get("accuracy_strict"), 1) if t.get("kind") == "letter" else ""
    return (
        f"| {name} | {n} | {acc} | {strict} | {_fmt(t.get('nll'), 4)} | {_fmt(t.get('ppl'), 2)} |"
    )


HEADER = (
    "| task | n | accuracy % | strict % | NLL (nats/token) | ppl |\n|---|---:|---:|---:|---:|---:|"
)


def markdown_report(summary: Mapping[str, Any]) -> str:
    """The per-task table, the unweighted 4-task mean, and the sets reported apart."""
    tasks = summary["tasks"]
    settings = summary.get("settings", {})
    model = summary.get("model", {})
    lines = ["# Math10K evaluation", ""]
    described = ", ".join(f"{k}: `{v}`" for k, v in model.items() if v not in (None, ""))
    if described:
        lines.append(f"- model: {described}")
    if settings:
        lines.append(
            "- preset `{preset}`: template `{template}`, {decoding}, {max_new_tokens} new tokens"
            "{limit}".format(
                preset=settings.get("preset"),
                template=settings.get("template"),
                decoding="greedy"
                if settings.get("num_beams", 1) <= 1
                else f"{settings['num_beams']}-beam search",
                max_new_tokens=settings.get("max_new_tokens"),
                limit=f"; first {settings['limit']} items per set" if settings.get("limit") else "",
            )
        )
        lines.append(
            f"- NLL: teacher-forced reference response (`{settings.get('reference', 'output')}`),"
            " nats per token, EOS included"
        )
    lines += [
        "- AQuA: `accuracy` is the reference rule (first capital A-E, used in the mean); "
        "`strict` is the letter the response commits to",
        "",
        HEADER,
    ]
    main = [n for n, t in tasks.items() if t["group"] == "main"]
    for name in main:
        lines.append(_row(name, tasks[name]))
    mean = summary.get("mean", {})
    if main:
        label = "**mean (4 tasks)**" if mean.get("complete") else f"mean ({len(main)} of 4 tasks)"
        lines.append(
            f"| {label} |  | {_fmt(mean.get('accuracy'), 1)} | "
            f"{_fmt(mean.get('accuracy_strict'), 1)} | {_fmt(mean.get('nll'), 4)} |  |"
        )
    for group, title in (
        ("extra", "Reported apart (they overlap Math10K's training sources; not in the mean):"),
        ("custom", "Custom test files (not in the mean):"),
    ):
        names = [n for n, t in tasks.items() if t["group"] == group]
        if names:
            lines += ["", title, "", HEADER]
            lines += [_row(n, tasks[n]) for n in names]
    if main:
        lines += [
            "",
            "The mean's `strict` column uses AQuA's strict accuracy instead of the reference rule.",
        ]
    return "\n".join(lines) + "\n"
