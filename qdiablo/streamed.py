"""A full-precision model that is never whole in memory: built on the meta device, its embeddings,
final norm and head read from the checkpoint's safetensors shards at once, and each decoder block
read only when `load_block(i)` asks for it (what `qdiablo quantize` does, one block at a time).

Works for a local folder or a hub model (its snapshot in the Hugging Face cache) whose
safetensors tensor names are the model's own (LLaMA, Mistral, Qwen2, Gemma, Phi-3, SmolLM, ...).
A GGUF file (the embedded `smollm2`), a `.bin` checkpoint, or a checkpoint whose names
transformers converts on load is loaded whole instead (`open_streamed` returns None and says
why): the bounds of docs/scale.md then do not hold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qdiablo.errors import UserError
from qdiablo.sources import parse_dtype, resolve_model
from quantizers.calibration import find_decoder_blocks
from quantizers.shards import CheckpointKeysError, ShardedCheckpoint, materialize

log = logging.getLogger(__name__)


@dataclass
class StreamedModel:
    """`model`: blocks on meta, everything else real on the host, in `dtype`."""

    model: nn.Module
    checkpoint: ShardedCheckpoint
    prefix: str
    dtype: torch.dtype
    folder: Path

    def load_block(self, i: int, device: torch.device | str = "cpu") -> nn.Module:
        """Decoder block i with its weights read from the shards onto `device` (in place: the
        model's own block object)."""
        block = find_decoder_blocks(self.model)[1][i]
        materialize(block, f"{self.prefix}.{i}.", self.checkpoint, device, self.dtype)
        return block

    def fingerprint(self) -> dict:
        """What identifies the checkpoint without reading its weights: its config and the size
        of each weights file."""
        from qdiablo.hashing import sha256_file

        return {
            "config_sha256": sha256_file(self.folder / "config.json"),
            "files": self.checkpoint.header_digest(),
            "dtype": str(self.dtype),
        }


def _snapshot(repo_id: str) -> Path:
    """A hub model's config and safetensors files, downloaded (or found) in the HF cache."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # network, auth, missing repo: one line
        raise UserError(f"could not download '{repo_id}' from the hub: {e}") from e


def meta_model(config, dtype: torch.dtype) -> nn.Module:
    """The model of a transformers config on the meta device, typed `dtype` (non-persistent
    buffers such as rotary tables real, as `from_pretrained` computes them)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def open_streamed(
    source: str, gguf_file: str | None = None, dtype: str | torch.dtype = "float32"
) -> StreamedModel | None:
    """The model of `source` with lazily read blocks, or None (logged) when it must be loaded
    whole (see the module docstring)."""
    from transformers import AutoConfig, GenerationConfig

    path, gguf = resolve_model(source, gguf_file)
    if gguf:
        log.info("%s is a GGUF file: loading it whole (it is dequantized on load)", gguf)
        return None
    folder = Path(path) if Path(path).is_dir() else _snapshot(path)
    if (folder / "quantize_config.json").is_file() or not (folder / "config.json").is_file():
        return None  # a quantized or export folder: load_base says what is wrong with it
    if not ShardedCheckpoint.present(folder):
        log.warning("%s holds no safetensors checkpoint: loading the model whole", folder)
        return None
    torch_dtype = parse_dtype(dtype)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"could not read the config of '{source}': {e}") from e
    model = meta_model(config, torch_dtype)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    try:
        checkpoint = ShardedCheckpoint(folder)
    except (OSError, ValueError) as e:
        raise UserError(str(e), hint="download the model again") from e
    prefix, blocks = find_decoder_blocks(model)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    keys = [k for k in model.state_dict() if not (k in tied and k not in checkpoint.files)]
    missing = [k for k in keys if k not in checkpoint.files and _persistent_meta(model, k)]
    if missing:
        log.warning(
            "%s: the checkpoint does not name the tensors as %s does (e.g. %s): loading the "
            "model whole",
            folder,
            type(model).__name__,
            missing[0],
        )
        return None
    outside = [k for k in keys if not k.startswith(prefix + ".")]
    try:
        materialize(model, "", checkpoint, "cpu", torch_dtype, names=outside)
    except CheckpointKeysError as e:
        log.warning("%s: loading the model whole", e)
        return None
    model.tie_weights()
    model.eval()
    log.info(
        "reading %s block by block (%d blocks; embeddings and head loaded)", folder, len(blocks)
    )
    return StreamedModel(model, checkpoint, prefix, torch_dtype, folder)


def _persistent_meta(model: nn.Module, key: str) -> bool:
    owner, _, leaf = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    tensor = module._parameters.get(leaf)
    if tensor is None:
        tensor = module._buffers.get(leaf)
    return tensor is not None and tensor.is_meta


def checkpoint_dtype(source: str, gguf_file: str | None, device: torch.device) -> torch.dtype:
    """The dtype the checkpoint's config records (`dtype` / `torch_dtype`); when it records none
    (a GGUF file), the device's compute dtype."""
    from qdiablo.devices import default_compute_dtype

    path, gguf = resolve_model(source, gguf_file)
    config_file = Path(path) / "config.json"
    if not gguf and config_file.is_file():
        from qdiablo.io import read_json

        config = read_json(config_file, what="model config")
        name = config.get("dtype") or config.get("torch_dtype")
        if isinstance(name, str) and name in ("float32", "float16", "bfloat16"):
            return parse_dtype(name)
    return default_compute_dtype(device)


def source_fingerprint(source: str, gguf_file: str | None = None) -> dict:
    """What identifies a model loaded whole (GGUF, .bin): its config and files, by size."""
    from qdiablo.hashing import sha256_file

    path, gguf = resolve_model(source, gguf_file)
    folder = Path(path)
    if not folder.is_dir():
        return {"hub_id": path}
    names = [gguf] if gguf else [p.name for p in folder.iterdir() if p.suffix in _WEIGHTS]
    config = folder / "config.json"
    return {
        "config_sha256": sha256_file(config) if config.is_file() else None,
        "files": {n: (folder / n).stat().st_size for n in sorted(names)},
    }


_WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
