"""Fault injection for tests/test_fault_injection.py: imported at start-up by a `python -m
qdiablo` child whose PYTHONPATH starts with this folder (never by qdiablo itself).

QDIABLO_FAULT_EVENTS=FILE records the child's progress events, one per line, as they happen:
every commit of a file (os.replace: atomic writes, staged installs), every torch.save and
safetensors save_file (checkpoints, weights), and every log record qdiablo emits.
QDIABLO_FAULT_KILL=N sends the child SIGKILL at its N-th event (1-based), before that event
happens: the points a kill lands on are chosen from the verb's own progress, not from a clock.
QDIABLO_FAULT_FULL=N fills the disk at the N-th event: from there on every write to a file fails
(RLIMIT_FSIZE 0; Python ignores SIGXFSZ, so the write returns EFBIG), as on a disk that filled up
while the verb was writing.
"""

import logging
import os
import signal

_events = os.environ.get("QDIABLO_FAULT_EVENTS")
_kill = int(os.environ.get("QDIABLO_FAULT_KILL", "0") or 0)
_full = int(os.environ.get("QDIABLO_FAULT_FULL", "0") or 0)
_count = 0


def _event(text: str) -> None:
    global _count
    _count += 1
    if _events:
        with open(_events, "a", encoding="utf-8") as f:
            f.write(f"{_count}\t{' '.join(text.split())}\n")
    if _count == _kill:
        os.kill(os.getpid(), signal.SIGKILL)
    if _count == _full:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))


def _name(f) -> str:
    return os.path.basename(os.fspath(f)) if isinstance(f, str | os.PathLike) else "<stream>"


def _install() -> None:
    replace = os.replace

    def replacing(src, dst, *args, **kwargs):
        _event(f"replace {_name(dst)}")
        return replace(src, dst, *args, **kwargs)

    os.replace = replacing

    class Progress(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            _event(f"log {record.name}: {record.getMessage()[:80]}")

    for name in ("qdiablo", "eval", "quantizers"):  # not the root: the CLI's own logging stays
        logging.getLogger(name).addHandler(Progress(level=logging.INFO))

    # Patched before qdiablo or transformers bind them (`from safetensors.torch import ...`).
    import safetensors.torch
    import torch

    save, save_file = torch.save, safetensors.torch.save_file

    def saving(obj, f, *args, **kwargs):
        _event(f"torch.save {_name(f)}")
        return save(obj, f, *args, **kwargs)

    def saving_file(tensors, filename, *args, **kwargs):
        _event(f"save_file {_name(filename)}")
        return save_file(tensors, filename, *args, **kwargs)

    torch.save = saving
    safetensors.torch.save_file = saving_file


if _events or _kill or _full:
    _install()
