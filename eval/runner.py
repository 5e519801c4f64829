"""Run the Math10K evaluation of one model into an output folder, resuming where it stopped.

The folder holds:

- `run.json`: what produced the results (model, adapter, template, decoding, NLL reference).
  Resuming into a folder made with other settings is refused, unless `overwrite`.
- `<task>.jsonl`: one line per generated example, in the order batches finished:
  `index` (position in the test file), `prompt`, `response`, `extracted`, `label`, `correct`,
  `stopped` ("eos" or "length"), `new_tokens`, and for AQuA `extracted_strict`, `correct_strict`.
- `<task>.nll.jsonl`: one line per example: `index`, `nll_sum` (nats), `tokens`, `nll`.
- `summary.json` and `results.md`: every task's accuracy and NLL, the unweighted 4-task mean,
  and the extra and custom sets apart.

An interrupted run resumes from the JSON Lines files: finished examples are never redone (a
partially written last line is dropped and redone). Summaries always re-score the saved
responses with the current rules.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from eval import report
from eval.generate import eos_token_ids, iter_generate, pad_token_id
from eval.math10k import LETTER, Task, score_response
from eval.nll import TokenNLL, aggregate, iter_reference_nll
from eval.presets import DEFAULT_PRESET, PRESETS, EvalSettings, Preset
from qdiablo.data import EVAL_SETS, build_prompt, encode_prompt
from qdiablo.errors import UserError
from qdiablo.io import read_json, write_json, write_text
from qdiablo.outputs import OutputFolder

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "EvalSettings",
    "Preset",
    "evaluate",
]

FORMAT_VERSION = 1
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
MARKDOWN_FILE = "results.md"


# Settings that change what a finished example holds: resuming with others is refused.
_IDENTITY_SETTINGS = ("template", "max_new_tokens", "num_beams", "reference")


def _check_run_file(
    out: Path, identity: dict[str, Any], overwrite: bool, folder: OutputFolder | None = None
) -> None:
    path = out / RUN_FILE
    if overwrite:
        path.unlink(missing_ok=True)  # the folder already removed the rest of eval's own files
    elif path.is_file():
        saved = read_json(path, what="run file")
        old = saved.get("identity", {}) if isinstance(saved, dict) else {}
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        if diff:
            details = "; ".join(f"{k}: {old.get(k)!r} → {identity.get(k)!r}" for k in diff)
            raise UserError(
                f"{out} holds results of another evaluation ({details})",
                hint="pass another --output folder, or --overwrite to start it afresh",
            )
    elif any(out.glob("*.jsonl")):
        raise UserError(
            f"{out} holds result files but no {RUN_FILE}: cannot tell what produced them",
            hint="pass another --output folder, or --overwrite to start it afresh",
        )
    if folder is not None:
        folder.changing()  # checked: from here on a failure leaves the folder unfinished
    write_json(path, {"format_version": FORMAT_VERSION, "identity": identity})


def safe_name(name: str) -> str:
    """A task name as a file stem: `<stem>.jsonl` holds the task's per-example rows."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _load_done(path: Path, prompts: Sequence[str] | None, n: int) -> dict[int, dict]:
    """Finished rows by index; a row whose prompt no longer matches means the test file changed."""
    done: dict[int, dict] = {}
    for lineno, row in enumerate(report.read_jsonl(path), start=1):
        index = row.get("index")
        if not isinstance(index, int) or index < 0:
            raise UserError(f"{path}: line {lineno} has no valid 'index'")
        if prompts is not None and index < n and row.get("prompt") != prompts[index]:
            raise UserError(
                f"{path}: example {index} was generated from another prompt; the test file "
                "or the template changed",
                hint="pass another --output folder, or --overwrite",
            )
        done[index] = row
    return done


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[Task],
    output_dir: str | Path,
    settings: EvalSettings | None = None,
    *,
    model_info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate `model` on `tasks`, writing per-example JSON Lines, summary.json and results.md.

    Returns the summary. `model_info` (base, adapter, ...) is recorded and must match on resume.
    """
    settings = settings or EvalSettings()
    cfg = settings.resolved()
    out = Path(output_dir)
    names = output_names(tasks)
    folder = OutputFolder(
        out, "eval", overwrite=overwrite, resumable=True, known=names, signature=RUN_FILE
    )
    with folder:
        folder.claim(names)
        info = dict(model_info or {})
        identity = {**{k: cfg[k] for k in _IDENTITY_SETTINGS}, "model": info}
        _check_run_file(out, identity, overwrite, folder)
        summary = _evaluate_into(out, model, tokenizer, tasks, cfg, info, progress)
        folder.finish()
    return summary


def output_names(tasks: Sequence[Task]) -> list[str]:
    """The files an evaluation of `tasks` writes: all `--overwrite` may remove."""
    stems = [safe_name(t.name) for t in tasks]
    return [RUN_FILE, SUMMARY_FILE, MARKDOWN_FILE] + [
        f"{s}{suffix}" for s in stems for suffix in (".jsonl", ".nll.jsonl")
    ]


def _evaluate_into(out, model, tokenizer, tasks, cfg, info, progress) -> dict[str, Any]:
    """The evaluation proper, into a folder already held and checked by `evaluate`."""
    eos = eos_token_ids(model, tokenizer)
    pad = pad_token_id(tokenizer, eos)
    summaries: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    for task in tasks:
        records = task.records[: cfg["limit"]] if cfg["limit"] else task.records
        stem = safe_name(task.name)
        timing: dict[str, Any] = {}
        scores = None
        if cfg["generate"]:
            scores, timing["generate"] = _run_generation(
                model, tokenizer, task, records, out / f"{stem}.jsonl", cfg, eos, pad, progress
            )
        nll = None
        if cfg["nll"]:
            nll, timing["nll"] = _run_nll(
                model, tokenizer, task, records, out / f"{stem}.nll.jsonl", cfg, progress
            )
        summaries[task.name] = report.task_summary(
            group=task.group,
            kind=task.kind,
            source=task.source,
            scores=scores,
            nll=nll,
            n_total=len(task.records),
        )
        timings[task.name] = timing
        _log_task(task.name, summaries[task.name])

    summary = {
        "format_version": FORMAT_VERSION,
        "model": info,
        "settings": cfg,
        "tasks": summaries,
        "mean": report.mean_summary(summaries, EVAL_SETS),
        "timing": timings,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(out / SUMMARY_FILE, summary)
    write_text(out / MARKDOWN_FILE, report.markdown_report(summary))
    return summary


def _log_task(name: str, s: Mapping[str, Any]) -> None:
    parts = []
    if s.get("accuracy") is not None:
        parts.append(f"accuracy {s['accuracy']:.1f}% ({s['correct']}/{s['n']})")
    if s.get("accuracy_strict") is not None:
        parts.append(f"strict {s['accuracy_strict']:.1f}%")
    if s.get("nll") is not None:
        parts.append(f"NLL {s['nll']:.4f} (ppl {s['ppl']:.2f})")
    log.info("%s: %s", name, ", ".join(parts))


def _run_generation(model, tokenizer, task, records, path, cfg, eos, pad, progress):
    template = cfg["template"]
    prompts = [build_prompt(r.instruction, template, tokenizer) for r in records]
    done = _load_done(path, prompts, len(records))
    todo = [i for i in range(len(records)) if i not in done]
    if done:
        log.info(
            "%s: resuming, %d of %d examples already done",
            task.name,
            len(records) - len(todo),
            len(records),
        )
    start, generated = time.perf_counter(), 0
    if todo:
        ids = [encode_prompt(tokenizer, records[i].instruction, template) for i in todo]
        for batch in iter_generate(
            model,
            ids,
            eos_token_ids=eos,
            pad_token_id=pad,
            max_new_tokens=cfg["max_new_tokens"],
            num_beams=cfg["num_beams"],
            batch_size=cfg["batch_size"],
            progress=progress,
            desc=f"{task.name}: generating",
            dequant_cache=cfg["dequant_cache"],
        ):
            rows = []
            for g in batch:
                i = todo[g.index]
                response = tokenizer.decode(g.token_ids, skip_special_tokens=True).strip()
                row = _score_row(task, records[i].answer, response)
                rows.append(
                    {
                        "index": i,
                        "prompt": prompts[i],
                        "response": response,
                        **row,
                        "stopped": g.stopped,
                        "new_tokens": len(g.token_ids),
                    }
                )
                done[i] = rows[-1]
            report.append_jsonl(path, rows)
            generated += len(batch)
    elapsed = time.perf_counter() - start
    # Re-score every saved response with the current rules, in test-file order.
    scores = []
    for i in range(len(records)):
        row = done[i]
        scores.append(
            {**_score_row(task, records[i].answer, row["response"]), "stopped": row.get("stopped")}
        )
    timing = {"seconds": elapsed, "generated": generated}
    if generated:
        timing["examples_per_s"] = generated / elapsed if elapsed > 0 else None
    return scores, timing


def _score_row(task: Task, label: str, response: str) -> dict[str, Any]:
    s = score_response(task.kind, response, label)
    row = {"extracted": s.extracted, "label": label, "correct": s.correct}
    if task.kind == LETTER:
        row.update(extracted_strict=s.extracted_strict, correct_strict=s.correct_strict)
    return row


def _run_nll(model, tokenizer, task, records, path, cfg, progress):
    done_rows = _load_done(path, None, len(records))
    todo = [i for i in range(len(records)) if i not in done_rows]
    start = time.perf_counter()
    if todo:
        for batch in iter_reference_nll(
            model,
            tokenizer,
            [records[i] for i in todo],
            template=cfg["template"],
            reference=cfg["reference"],
            batch_size=cfg["batch_size"],
            progress=progress,
            desc=f"{task.name}: reference NLL",
            dequant_cache=cfg["dequant_cache"],
        ):
            rows = []
            for item in batch:
                i = todo[item.index]
                row = _nll_row(i, item)
                rows.append(row)
                done_rows[i] = row
            report.append_jsonl(path, rows)
    elapsed = time.perf_counter() - start
    bad = [i for i in range(len(records)) if done_rows[i].get("nll_sum") is None]
    items = [
        TokenNLL(i, float(done_rows[i]["nll_sum"]), int(done_rows[i]["tokens"]))
        for i in range(len(records))
        if i not in bad
    ]
    agg = aggregate(items)
    agg["n"] = len(records)
    if bad:  # a task mean over the finite rows alone would hide the problem: no mean at all
        agg.update(nll=float("nan"), ppl=float("nan"), nonfinite=len(bad))
        log.warning(
            "%s: the NLL of %d example(s) is not finite (e.g. index %d): the task's NLL is left "
            "empty; the model (or its adapter) produces NaN/inf logits",
            task.name,
            len(bad),
            bad[0],
        )
    return agg, {"seconds": elapsed, "computed": len(todo)}


def _nll_row(index: int, item: TokenNLL) -> dict[str, Any]:
    """One example's NLL record; a non-finite sum is written as null with a flag, so that the
    file stays valid JSON and a rerun does not stop at it."""
    if not math.isfinite(item.nll_sum):
        return {"index": index, "nll_sum": None, "tokens": item.tokens, "nll": None,
                "nonfinite": True}  # fmt: skip
    return {
        "index": index,
        "nll_sum": item.nll_sum,
        "tokens": item.tokens,
        "nll": item.mean if item.tokens else None,
    }
