"""Resumable quantization: each decoder block is saved as soon as it is finished, so a quantize
killed at block k continues from block k when it is run again with the same settings.

    OUTPUT/.quantize-partial/
      state.json               what the work depends on (settings, model, calibration windows,
                               dtypes, device type, torch version): a run in which anything
                               differs is refused, naming the difference
      block-00000.safetensors  block 0 as quantized (its packed layers and other tensors, in
                               the in-memory gptq_v2 convention), its report lines in the
                               file's metadata
      ...

Every file is written atomically (a temporary name, then a rename), so a block file is whole or
absent. The next block's inputs are not stored: a resumed run recomputes them by running the
calibration windows through the finished blocks (and, for reconstruction, through the original
blocks too), the same operations on the same values as the first run, so the final folder is the
same to the bit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from quantizers.calibration import block_linears
from quantizers.fileio import atomic_path, read_json, write_json
from quantizers.quant_linear import QuantLinear
from quantizers.reconstruct import BlockRecon
from quantizers.report import LayerReport

log = logging.getLogger(__name__)

PARTIAL_DIR = ".quantize-partial"
STATE_NAME = "state.json"
STATE_FORMAT = 1


class ResumeMismatch(ValueError):
    """The folder holds partial work of a different configuration."""


def differences(mine: Any, theirs: Any, path: str = "") -> list[str]:
    """Where two JSON-like values differ, as 'key.path: this run X, the folder's Y' lines."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        out = []
        for key in sorted(set(mine) | set(theirs), key=str):
            sub = f"{path}.{key}" if path else str(key)
            out += differences(mine.get(key, "(absent)"), theirs.get(key, "(absent)"), sub)
        return out
    if mine != theirs:
        return [f"{path or 'state'}: this run {mine!r}, the folder's {theirs!r}"]
    return []


def tensor_digest(tensors: list[torch.Tensor] | None) -> str | None:
    """sha256 of the calibration windows (their shapes and token ids)."""
    if tensors is None:
        return None
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class BlockStore:
    """The finished blocks of one quantize run, in `folder` (see the module docstring).

    `identity`: a JSON-able dict of everything the result depends on; `start` compares it with
    the folder's and refuses a mismatch (or, with `discard`, starts over)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        identity: dict[str, Any] | None = None,
        discard: bool = False,
    ):
        self.folder = Path(folder)
        self.identity: dict[str, Any] = dict(identity or {})
        self.discard = discard

    def _file(self, index: int) -> Path:
        return self.folder / f"block-{index:05d}.safetensors"

    def start(self, num_blocks: int) -> int:
        """Check or record the identity; return how many blocks (0..k-1) are already done."""
        state = {"format": STATE_FORMAT, "blocks": num_blocks, **self.identity}
        state = json.loads(json.dumps(state, default=str))  # as it will read back
        saved_file = self.folder / STATE_NAME
        if saved_file.is_file():
            saved = read_json(saved_file, what="partial quantize state")
            diff = differences(state, saved)
            finished = self._file(0).is_file()
            if diff and finished and not self.discard:
                raise ResumeMismatch(
                    f"{self.folder} holds the partial work of a different quantize "
                    f"({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''})"
                )
            if diff:  # discarded on request, or nothing to lose (no block was finished)
                log.warning("discarding %s: other settings (%s)", self.folder, diff[0])
                self.remove()
        self.folder.mkdir(parents=True, exist_ok=True)
        if not saved_file.is_file():
            write_json(saved_file, state)
        done = 0
        while done < num_blocks and self._file(done).is_file():
            done += 1
        for extra in sorted(self.folder.glob("block-*.safetensors")):
            if extra.name >= self._file(done).name:  # past a gap: not usable, redo
                extra.unlink()
        if done:
            log.info(
                "resuming: %d of %d blocks already quantized in %s", done, num_blocks, self.folder
            )
        return done

    def save(
        self, index: int, block: nn.Module, layers: list[LayerReport], recon: BlockRecon | None
    ) -> None:
        """Write block `index` (all its tensors, on the host) and its report lines, atomically."""
        state = {k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
        report = {
            "layers": [dataclasses.asdict(r) for r in layers],
            "reconstruction": None if recon is None else dataclasses.asdict(recon),
        }
        with atomic_path(self._file(index)) as tmp:
            save_file(state, tmp, metadata={"report": json.dumps(report)})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        log.info("block %d saved to %s", index, self._file(index))

    def load(
        self, index: int, block: nn.Module, bits: int, group_size: int, prefix: str
    ) -> tuple[list[LayerReport], BlockRecon | None]:
        """Turn `block` (on meta, or holding full-precision weights) into finished block `index`
        in place, on the host, and return its report lines."""
        file = self._file(index)
        with safe_open(file, framework="pt") as f:
            report = json.loads((f.metadata() or {}).get("report", "{}"))
            names = f.keys()  # a safe_open handle is not iterable
            state = {k: f.get_tensor(k) for k in names}
        for name, lin in block_linears(block, prefix).items():
            if f"{name}.qweight" not in state:
                continue  # left unquantized (never called on the calibration data)
            bias = state.get(f"{name}.bias")
            block.set_submodule(
                name,
                QuantLinear(
                    lin.in_features,
                    lin.out_features,
                    bits,
                    group_size,
                    bias=bias is not None,
                    bias_dtype=bias.dtype if bias is not None else torch.float32,
                    device="meta",
                ),
            )
        block.load_state_dict(state, strict=True, assign=True)
        layers = [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in report["layers"]]
        recon = report.get("reconstruction")
        return layers, None if recon is None else BlockRecon(**recon)

    def remove(self) -> None:
        # safe: the store's own folder (qdiablo quantize claims it in its marker), removed once
        # the finished model is saved
        shutil.rmtree(self.folder, ignore_errors=True)
