"""Stages: one `qdiablo <verb>` call each, with an identity, a marker, and skip/resume rules.
(One file over 400 lines: a stage and the runner that skips, resumes and clears it are one rule.)

A stage's identity is the sha256 of the verb's fully resolved arguments (every flag after
defaults, minus output paths and other settings that do not change the result), the identities of
the stages it consumes, and the qdiablo version. On success the stage writes
`<root>/stages/<key>.json` atomically (hash, run id, the run ids of its inputs, time, wall
seconds). A re-run skips a stage whose marker has the same hash, whose inputs are the same runs,
and whose output is there; anything else runs again, and so does everything downstream (the run
ids change). A stage that started but never finished (`<key>.started.json`, same hash) resumes
where the verb can (training from its checkpoints, evaluation from its finished items); otherwise
its earlier output is removed first: exactly what its verb's marker (`.qdiablo-<verb>.json`)
lists, never a whole folder; anything else there is kept and named in one line.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import logging
import os
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qdiablo import __version__
from qdiablo.commands import eval as evaluate
from qdiablo.commands import export, quantize, train
from qdiablo.errors import UserError
from qdiablo.flags import add_verb_parser, config_defaults
from qdiablo.hashing import sha256_file
from qdiablo.inputs import check_apart, unfinished
from qdiablo.io import read_json, write_json, write_text
from qdiablo.outputs import OutputFolder, marker_name
from qdiablo.ownership import remove_output

log = logging.getLogger("qdiablo.pipeline")

MARKER_DIR = "stages"
# Settings that never change what a stage produces (paths are covered by the inputs' identities).
NEUTRAL_KEYS = frozenset(
    {
        "command",
        "config",
        "verbose",
        "_run",
        "output",
        "overwrite",
        "resume",
        "progress",
        "no_progress",
        "threads",
        "device",  # where a stage runs, like threads: not what it is
        "logging_steps",
        "save_steps",
        "save_total_limit",
    }
)


# Flags naming input files: their content goes into the identity, not only their path.
FILE_KEYS = frozenset({"data", "calib", "task_file", "tasks"})


def _file_digest(value: Any) -> Any:
    """A path to an existing file becomes {path, sha256}; lists element-wise; else unchanged."""
    if isinstance(value, list):
        return [_file_digest(v) for v in value]
    if isinstance(value, str) and Path(value).is_file():
        return {"path": value, "sha256": sha256_file(value)}
    return value


# The verbs a stage may run (the pipeline verbs run, compare and demo build stages of these).
STAGE_VERBS = {"quantize": quantize, "train": train, "eval": evaluate, "export": export}


def parse_verb_args(verb: str, values: dict[str, Any], source: str) -> argparse.Namespace:
    """The Namespace `qdiablo <verb>` would get from a YAML config holding `values`.

    Unknown keys, wrong types and bad choices are a UserError naming `source` (e.g.
    "config.yaml [train]"), raised before anything runs.
    """
    if verb not in STAGE_VERBS:
        raise UserError(
            f"{source}: `qdiablo {verb}` cannot be a pipeline stage",
            hint=f"stages run: {', '.join(STAGE_VERBS)}",
        )
    parser = add_verb_parser(None, verb, STAGE_VERBS[verb])
    parser.set_defaults(command=verb, verbose=False)  # as `qdiablo <verb>` would have them
    plain = {k: _plain(v) for k, v in values.items()}
    defaults = config_defaults(parser, plain, source)
    parser.set_defaults(**defaults)
    missing = [
        a.option_strings[-1] for a in parser._actions if a.required and a.dest not in defaults
    ]
    if missing:
        raise UserError(f"{source}: missing {', '.join(missing)}")
    return parser.parse_args([])


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(eq=False)
class Stage:
    """One verb call. `args` are long flag names (with `_`) to values: user keys plus wiring."""

    key: str
    verb: str
    args: dict[str, Any]
    output: Path
    done_file: str = ""  # relative to output; "" = the folder itself, non-empty
    deps: list[Stage] = field(default_factory=list)
    path_keys: frozenset[str] = frozenset()  # args holding other stages' outputs
    source: str = ""
    # Given the output folder of a started-but-unfinished run, the extra args to resume it, or
    # None when it cannot resume (its outputs are then removed and it starts afresh).
    resume: Callable[[Path], dict[str, Any] | None] = lambda _: None
    _namespace: argparse.Namespace | None = None
    _identity: str | None = None

    def namespace(self) -> argparse.Namespace:
        if self._namespace is None:
            self._namespace = parse_verb_args(self.verb, self.args, self.source or self.key)
        return self._namespace

    def resolved(self) -> dict[str, Any]:
        """The resolved arguments that define what the stage produces."""
        skip = NEUTRAL_KEYS | self.path_keys
        return {
            k: _file_digest(v) if k in FILE_KEYS else v
            for k, v in sorted(vars(self.namespace()).items())
            if k not in skip
        }

    @property
    def identity(self) -> str:
        if self._identity is None:
            payload = {
                "verb": self.verb,
                "args": self.resolved(),
                "inputs": {d.key: d.identity for d in self.deps},
                "qdiablo": __version__,
            }
            blob = json.dumps(payload, sort_keys=True, default=str).encode()
            self._identity = hashlib.sha256(blob).hexdigest()
        return self._identity

    def is_done(self) -> bool:
        """Its output is there, and its verb's marker (when it has one) says finished."""
        target = self.output / self.done_file if self.done_file else self.output
        there = target.exists() if self.done_file else target.is_dir() and any(target.iterdir())
        return there and unfinished(self.output, (self.verb,)) is None

    def inputs(self) -> dict[str, Any]:
        """The local paths it reads that no other stage writes (the model, data files)."""
        found = {}
        for key in ("model", *sorted(FILE_KEYS)):
            value = getattr(self.namespace(), key, None)
            if key not in self.path_keys and value is not None:
                found[f"{self.key} {key}"] = value
        return found


@dataclass
class Outcome:
    stage: Stage
    status: str  # "ran", "resumed", "skipped"
    seconds: float
    run_id: str
    # Peak resident memory in MiB: the stage's own process when isolated, else the whole
    # process's high-water mark so far (which includes the stages before it).
    peak_rss_mib: float | None = None


def ordered(stages: Iterable[Stage]) -> list[Stage]:
    """Stages and their inputs, each once (by key), inputs first."""
    seen: dict[str, Stage] = {}

    def visit(s: Stage) -> None:
        if s.key in seen:
            if seen[s.key] is not s and seen[s.key].identity != s.identity:
                raise UserError(f"two different stages share the key '{s.key}'")
            return
        for d in s.deps:
            visit(d)
        seen[s.key] = s

    for s in stages:
        visit(s)
    return list(seen.values())


class Runner:
    """Runs stages in order under `root`, skipping or resuming as the module docstring says."""

    def __init__(
        self,
        root: Path,
        force: Iterable[str] = (),
        isolate: bool = False,
        verb: str = "run",
        overwrite: bool = False,
        threads: int | None = None,
        device: str | None = None,
    ):
        self.root = Path(root)
        # device: passed to every stage whose verb takes --device, unless the stage sets its own
        self.device = device
        self.verb = verb  # whose marker the root folder carries (run, demo, compare)
        self.overwrite = overwrite
        self.markers = self.root / MARKER_DIR
        self.force = set(force)
        # isolate: each stage in its own `python -m qdiablo` process, so that peak memory is the
        # stage's own (in one process, freed memory of earlier stages stays resident).
        self.isolate = isolate
        # threads: torch's CPU thread count for every stage. Float sums are reduced in an order
        # that depends on it, so a fixed count makes a re-run give the same numbers.
        if threads is not None and threads < 1:
            raise UserError(f"--threads {threads}: must be ≥ 1")
        self.threads = threads
        self.run_ids: dict[str, str] = {}
        self.outcomes: list[Outcome] = []

    def _marker(self, stage: Stage, started: bool = False) -> Path:
        return self.markers / f"{stage.key}{'.started' if started else ''}.json"

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            data = read_json(path)
        except UserError:
            return None
        return data if isinstance(data, dict) else None

    def validate(self, stages: list[Stage]) -> None:
        """Resolve every stage's arguments (and identity) before any of them runs."""
        for s in stages:
            s.namespace()
            _ = s.identity

    def run(
        self,
        stages: list[Stage],
        after: Callable[[], Any] | None = None,
        reports: Iterable[str] = (),
    ) -> list[Outcome]:
        """Run the stages while holding the root folder (qdiablo.outputs: lock, marker, no
        foreign files touched), then `after()` (e.g. writing `reports`, names under root)."""
        stages = ordered(stages)
        self.validate(stages)
        inputs: dict[str, Any] = {}
        for s in stages:
            inputs.update(s.inputs())
        check_apart(self.root, inputs, flag="output")
        names = {MARKER_DIR, *reports}
        root = self.root.resolve()
        for s in stages:
            with contextlib.suppress(ValueError):
                names.add(s.output.resolve().relative_to(root).parts[0])
        self._adopt_legacy(names)
        folder = OutputFolder(
            self.root, self.verb, overwrite=self.overwrite, resumable=True, known=names
        )
        with folder:
            folder.claim(names)
            for s in stages:
                self.outcomes.append(self._run_one(s))
            if after is not None:
                after()
            folder.finish()
        return self.outcomes

    def _adopt_legacy(self, names: set[str]) -> None:
        """A root written before output markers existed: its `stages/` folder shows this
        machinery made it, so the stage outputs it names are adopted as the verb's own."""
        if not self.markers.is_dir() or any(self.root.glob(".qdiablo-*.json")):
            return
        owned = sorted(n for n in names if (self.root / n).exists())
        write_json(
            self.root / marker_name(self.verb),
            {"verb": self.verb, "format_version": 1, "complete": False, "files": owned},
        )

    def _run_one(self, stage: Stage) -> Outcome:
        inputs = {d.key: self.run_ids[d.key] for d in stage.deps}
        # An input that ran again has a new run id, so everything downstream runs again too.
        forced = stage.key in self.force or stage.verb in self.force
        done = self._read(self._marker(stage))
        if (
            not forced
            and done is not None
            and done.get("hash") == stage.identity
            and done.get("inputs") == inputs
            and stage.is_done()
        ):
            log.info("%s: up to date, skipped", stage.key)
            self.run_ids[stage.key] = done["run_id"]
            return Outcome(stage, "skipped", 0.0, done["run_id"])

        started = self._read(self._marker(stage, started=True))
        extra: dict[str, Any] | None = None
        if (
            done is None
            and started is not None
            and started.get("hash") == stage.identity
            and started.get("inputs") == inputs
            and not forced
        ):
            extra = stage.resume(stage.output)
        if extra is None:
            self._clear(stage)
        self._marker(stage).unlink(missing_ok=True)
        write_json(self._marker(stage, started=True), {"hash": stage.identity, "inputs": inputs})

        status = "ran" if extra is None else "resumed"
        log.info(
            "%s: %s `qdiablo %s` -> %s",
            stage.key,
            "running" if extra is None else "resuming",
            stage.verb,
            stage.output,
        )
        start = time.time()
        rc, peak_kib, cpu = self._execute(stage, extra)
        seconds = time.time() - start
        peak_mib = round(peak_kib / 1024, 1)
        gc.collect()
        if rc not in (0, None):
            raise UserError(f"{stage.key}: `qdiablo {stage.verb}` exited with status {rc}")
        run_id = uuid.uuid4().hex
        write_json(
            self._marker(stage),
            {
                "stage": stage.key,
                "verb": stage.verb,
                "hash": stage.identity,
                "run_id": run_id,
                "inputs": inputs,
                "args": stage.resolved(),
                "output": str(stage.output),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "wall_seconds": round(seconds, 3),
                "cpu_seconds": None if cpu is None else round(cpu, 3),
                "peak_rss_mib": peak_mib,
                "peak_rss_of": "stage process" if self.isolate else "whole process so far",
                "threads": self.threads,
                "status": status,
            },
        )
        self._marker(stage, started=True).unlink(missing_ok=True)
        self.run_ids[stage.key] = run_id
        log.info("%s: done in %.1f s, peak RSS %.0f MiB", stage.key, seconds, peak_mib)
        return Outcome(stage, status, seconds, run_id, peak_mib)

    def _execute(self, stage: Stage, extra: dict[str, Any] | None) -> tuple[int, int, float | None]:
        """Run the stage's verb (with `extra` args, e.g. train's resume=auto, and the runner's
        device); its exit status, peak RSS in KiB (the stage process's when isolated) and the
        stage process's user + system CPU seconds (isolated stages only, else None)."""
        placed = self._device_args(stage)
        # A stage run afresh may write among the files of the user's that _clear kept
        # (overwrite: they stay); a resumed one (extra, e.g. resume=auto) keeps its own too.
        args = {**placed, **stage.args, **(extra or {}), "overwrite": extra is None}
        if self.isolate:
            return self._subprocess(stage, args)
        namespace = parse_verb_args(stage.verb, args, stage.key)
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        rc = namespace._run(namespace)
        return rc, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, None  # KiB on Linux

    def _device_args(self, stage: Stage) -> dict[str, Any]:
        """{"device": ...} for a stage whose verb has a --device flag, when one is set."""
        if self.device is None or "device" not in vars(stage.namespace()):
            return {}
        return {"device": self.device}

    def _subprocess(self, stage: Stage, args: dict[str, Any]) -> tuple[int, int, float]:
        """`python -m qdiablo <verb> --config <args file>`: the verb's own YAML config path.
        Returns the exit status, the process's peak RSS in KiB and its user + system CPU
        seconds (from wait4's rusage: on a busy machine, the work done, apart from waiting)."""
        file = self.markers / f"{stage.key}.args.yaml"
        write_text(file, yaml.safe_dump({k: _plain(v) for k, v in args.items()}))
        repo = str(Path(__file__).resolve().parents[2])  # works without a pip install
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
        }
        if self.threads:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        command = [sys.executable, "-m", "qdiablo", stage.verb, "--config", str(file)]
        child = subprocess.Popen(command, env=env)
        try:
            _, status, usage = os.wait4(child.pid, 0)
        except BaseException:
            child.kill()
            child.wait()
            raise
        child.returncode = os.waitstatus_to_exitcode(status)
        return child.returncode, usage.ru_maxrss, usage.ru_utime + usage.ru_stime

    def _clear(self, stage: Stage) -> None:
        """Remove a stage's earlier output: what its verb's marker lists, never a whole folder
        (the rest is kept and named in one line)."""
        out = stage.output
        if not out.exists():
            return
        root = self.root.resolve()
        if root not in out.resolve().parents:
            raise UserError(f"{stage.key}: refusing to remove {out}, outside {self.root}")
        log.info("%s: removing the stale output of `qdiablo %s` in %s", stage.key, stage.verb, out)
        remove_output(out, stage.verb)


def summary_table(outcomes: list[Outcome]) -> str:
    """A plain-text table: stage, status, wall time, peak RSS (MiB; "-" for a skipped stage)."""
    width = max([5, *(len(o.stage.key) for o in outcomes)])
    lines = [f"{'stage':<{width}}  {'status':<8}  {'wall s':>8}  {'peak RSS MiB':>12}"]
    for o in outcomes:
        rss = "-" if o.peak_rss_mib is None else f"{o.peak_rss_mib:.0f}"
        lines.append(f"{o.stage.key:<{width}}  {o.status:<8}  {o.seconds:>8.1f}  {rss:>12}")
    return "\n".join(lines)
