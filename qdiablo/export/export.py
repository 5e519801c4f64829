"""export_model: one folder holding everything needed to use a trained model.

    EXPORT_DIR/
      base/           the quantized base, the files of `qdiablo quantize` as they were (GPTQ layout)
      adapter/        the adapter (DiaBlo: its fingerprint matches base/)
      merged/         with merged=True: a plain HF model, W + Dᵀ on the dequantized base
      merged-gptq/    with requantize=True: merged/ re-quantized (outputs change: see README.md)
      marlin/         with serve.marlin: merged/ re-quantized for vLLM/SGLang's GPTQ-Marlin
      gguf/           with serve.gguf: one GGUF file for llama.cpp/ollama (qdiablo.export.serving)
      README.md       the model card
      manifest.json   sha256 and size of every other file

The folder is built beside the target and renamed into place at the end, so a crash never leaves
an export that looks whole; the adapter is loaded onto the base (fingerprint check) before
anything is written. `qdiablo.models.load_exported` loads it back.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from qdiablo.adapters.loading import adapter_method, load_adapter
from qdiablo.adapters.method import AdapterMethod
from qdiablo.adapters.scales import has_trained_scales
from qdiablo.calibration import build_calibration_data, check_reconstruction_windows
from qdiablo.devices import default_compute_dtype, resolve_device
from qdiablo.errors import UserError
from qdiablo.export.card import CardFacts, model_card
from qdiablo.export.facts import card_facts
from qdiablo.export.merge import merge_into_dense, mergeable_names, write_merged
from qdiablo.export.merge import requantize_merged as requantize_streamed
from qdiablo.export.scales import drop_scales_from_adapter_copy, fold_into_base_copy
from qdiablo.export.serving import (
    ServeOptions,
    ServePlan,
    plan_serving,
    serving_usage,
    write_serving,
)
from qdiablo.faults import guard
from qdiablo.inputs import check_apart, require_finished
from qdiablo.manifest import MANIFEST_NAME, build_manifest
from qdiablo.models import is_quantized_folder, load_packed
from qdiablo.outputs import OutputFolder
from qdiablo.ownership import read_marker
from quantizers import QuantConfig, save_quantized

log = logging.getLogger(__name__)

MERGED_DTYPES = ("float16", "bfloat16", "float32")


# Everything export writes at the top of its folder: all `--overwrite` may remove.
EXPORT_NAMES = (
    "base",
    "adapter",
    "merged",
    "merged-gptq",
    "marlin",
    "gguf",
    "README.md",
    MANIFEST_NAME,
)
# A base folder without a `qdiablo quantize` marker (another tool's GPTQ folder): the files of
# a Hugging Face GPTQ checkpoint, the only ones copied.
BASE_FILES = (
    "config.json",
    "generation_config.json",
    "quantize_config.json",
    "quantization_report.json",
    "quantization_report.md",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)
# An adapter folder's files (DiaBlo's, or PEFT's weights and config): the only ones copied.
ADAPTER_COPY = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def base_files(base: Path) -> list[str]:
    """The files of a quantized base that an export copies: those its `qdiablo quantize` marker
    lists, else (another tool's folder) those of a GPTQ checkpoint; never anything else."""
    marker = read_marker(base, "quantize")
    if marker is not None:
        names = [n for n in marker["files"] if (base / n).is_file()]
    else:
        names = [
            p.name
            for p in base.iterdir()
            if p.is_file() and any(fnmatch.fnmatchcase(p.name, pat) for pat in BASE_FILES)
        ]
    return sorted(names)


def _copy_files(source: Path, names: Sequence[str], target: Path) -> None:
    target.mkdir()
    for name in names:
        shutil.copy2(source / name, target / name)


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer  # deferred: seconds to import

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        log.warning("%s holds no loadable tokenizer (%s): the export will have none", folder, e)
        return None


def requantize_config(base_entry: Mapping[str, Any], overrides: Mapping[str, Any] | None):
    """The QuantConfig for re-quantizing: the base's settings, with `overrides` applied."""
    ours = dict((base_entry.get("meta") or {}).get("qdiablo") or {})
    if ours:
        fields = {k: v for k, v in ours.items() if not k.startswith("resolved_")}
    else:  # a GPTQ folder written by another tool: its top-level keys
        log.info(
            "the base's quantize_config has no qdiablo settings: re-quantizing without MagR or "
            "block-wise reconstruction unless the flags ask for them"
        )
        names = {f.name for f in dataclasses.fields(QuantConfig)}
        fields = {k: v for k, v in base_entry.items() if k in names}
    fields.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return QuantConfig(**fields)
    except (TypeError, ValueError) as e:
        raise UserError(f"re-quantization settings: {e}") from e


def export_model(
    base: str | Path,
    adapter: str | Path | None,
    output: str | Path,
    *,
    train_run: str | Path | None = None,
    evals: Sequence[str | Path] = (),
    merged: bool = False,
    merged_dtype: str = "float16",
    requantize_merged: bool = False,
    calib: str | Path | None = None,
    calib_samples: int = 64,
    calib_seq_len: int = 256,
    calib_batch_size: int = 8,
    quant_overrides: Mapping[str, Any] | None = None,
    base_name: str | None = None,
    overwrite: bool = False,
    device: str | torch.device = "auto",
    max_shard_size: int | None = None,
    serve: ServeOptions | None = None,
) -> Path:
    """Write an export folder (see the module docstring) and return its path.

    `adapter` defaults to `train_run/adapter`. `requantize_merged` implies `merged` and needs a
    `calib` file; its settings are the base's quantize_config with `quant_overrides` applied.
    `serve` (marlin/, gguf/) implies `merged`; the re-quantizations it runs take the same
    settings (Marlin then fixes its grid) and need `calib` too.
    `device`: where merging and re-quantizing run, one block at a time (auto: a GPU if there is
    one); the packed model and the shards being written stay on the host. `max_shard_size`:
    the largest file of merged/ in bytes (default 5 GB).
    """
    serve = serve or ServeOptions()
    base, output, device = Path(base), Path(output), resolve_device(device)
    train_dir = Path(train_run) if train_run is not None else None
    adapter = _adapter_folder(adapter, train_dir)
    inputs = {"--base": base, "--adapter": adapter, "--train-run": train_dir, "--eval": evals}
    check_apart(output, {**inputs, "--eval": list(evals), "--calib": calib})
    merged = merged or requantize_merged or serve.any
    method, kind = _check_request(
        base, adapter, merged, merged_dtype, requantize_merged, calib, serve
    )
    folder = OutputFolder(output, "export", overwrite=overwrite, known=EXPORT_NAMES)
    with folder:
        _check_parts_hold_only_ours(folder, _parts(merged, requantize_merged, serve))
        facts = card_facts(base, adapter, method, kind, train_dir, evals, base_name)
        facts.merged_dtype = merged_dtype if merged else None
        tokenizer = _load_tokenizer(base)
        base_model = load_packed(base)
        config, plan, calib_data = _requantize_inputs(
            requantize_merged, serve, facts, quant_overrides, base_model, tokenizer, base,
            (calib, calib_samples, calib_seq_len, calib_batch_size),
        )  # fmt: skip
        # the fingerprint check, before any write; trained scales are folded into base_model
        model = load_adapter(base_model, adapter)
        log.info("exporting %s + %s to %s", base, adapter, output)
        tmp = folder.staging()  # the output is untouched until install (which marks it changed)
        try:
            with guard(output):
                _copy_inputs(model, base, adapter, tmp, facts)
            if merged:
                log.info("merging the adapter into the dequantized base (%s)", merged_dtype)
                dtype = getattr(torch, merged_dtype)
                write_merged(model, tmp / "merged", dtype, tokenizer, device, max_shard_size)
            requantized = None
            if requantize_merged:
                requantized = _write_requantized(
                    model, tmp, calib_data, config, device, tokenizer, facts, calib, calib_seq_len
                )
            if serve.any:  # marlin/ and gguf/ are written from the whole merged model
                merge = functools.partial(_merged_from_files, base, adapter)
                _write_serving_folders(
                    plan, tmp, merge, tokenizer, calib_data, output, requantized, facts
                )
            manifest = _finish_folder(tmp, facts)
            folder.install(tmp)
            folder.finish()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # safe: our staging folder (folder.staging)
        log.info("exported %d files to %s", len(manifest["files"]), output)
        return output


def _parts(merged: bool, requantize_merged: bool, serve: ServeOptions) -> list[str]:
    """The top-level folders this export writes."""
    parts = ["base", "adapter"] + ["merged"] * merged + ["merged-gptq"] * requantize_merged
    return parts + ["marlin"] * serve.marlin + ["gguf"] * (serve.gguf is not None)


def _requantize_inputs(
    requantize_merged: bool,
    serve: ServeOptions,
    facts: CardFacts,
    quant_overrides,
    base_model,
    tokenizer,
    base: Path,
    calib_settings: tuple,
):
    """What the re-quantizations need: their QuantConfig, the serving plan and the calibration
    windows (None and an empty plan when nothing is re-quantized)."""
    config = calib_data = None
    plan = ServePlan()
    if requantize_merged or serve.any:
        config = requantize_config(facts.quantize_config, quant_overrides)
        plan = plan_serving(serve, config, base_model, tokenizer)
    if requantize_merged or plan.needs_calibration:
        check_reconstruction_windows(config, calib_settings[1])
        what = "--requantize" if requantize_merged else "--serve marlin / an exact --gguf"
        calib_data = _calibration(what, tokenizer, base, *calib_settings)
    return config, plan, calib_data


def _merged_from_files(base: Path, adapter: Path):
    """The whole merged model, loaded afresh (the streamed merges consumed nothing of it)."""
    return merge_into_dense(load_adapter(load_packed(base), adapter))


def _write_serving_folders(
    plan: ServePlan, tmp: Path, merge, tokenizer, calib_data, output: Path, requantized, facts
) -> None:
    """marlin/ and gguf/, from the whole merged model `merge()` returns; their card lines."""
    facts.serving = write_serving(
        plan, tmp, merge, tokenizer, calib_data, output.resolve().name, requantized=requantized
    )
    facts.serving_usage = serving_usage(
        [p.name for p in tmp.iterdir()], plan.gguf.file_name if plan.gguf else None
    )


def _copy_inputs(model, base: Path, adapter: Path, tmp: Path, facts: CardFacts) -> None:
    """base/ and adapter/: their own files only, with trained scales (--train-scales) moved
    from the adapter into the base (qdiablo.export.scales)."""
    _copy_files(base, base_files(base), tmp / "base")
    adapter_files = [n for n in ADAPTER_COPY if (adapter / n).is_file()]
    _copy_files(adapter, adapter_files, tmp / "adapter")
    if has_trained_scales(adapter):
        fold_into_base_copy(model, tmp / "base")
        drop_scales_from_adapter_copy(model, tmp / "adapter")
        facts.notes.append(
            "base/ holds the scales trained with the adapter (--train-scales), folded "
            "into its fp16 scales; adapter/ is the adapter trained on them"
        )


def _adapter_folder(adapter: str | Path | None, train_dir: Path | None) -> Path:
    """The adapter folder given, or the training run's."""
    if adapter is None:
        if train_dir is None:
            raise UserError("no adapter given", hint="pass --adapter DIR or --train-run DIR")
        adapter = train_dir / "adapter"
    return Path(adapter)


def _check_request(
    base: Path,
    adapter: Path,
    merged: bool,
    merged_dtype: str,
    requantize_merged: bool,
    calib,
    serve: ServeOptions,
) -> tuple[AdapterMethod, str]:
    """Refuse what cannot be exported before anything is read or written; returns the adapter's
    method and kind (as its adapter_config.json names it)."""
    require_finished(base, ("quantize",), what="--base")
    if not is_quantized_folder(base):
        raise UserError(
            f"--base {base} is not a folder written by `qdiablo quantize` (no quantize_config.json)"
        )
    method, kind = adapter_method(adapter)
    if merged_dtype not in MERGED_DTYPES:
        raise UserError(f"--merged-dtype {merged_dtype!r}: choose from {', '.join(MERGED_DTYPES)}")
    if merged and not method.mergeable:
        raise UserError(
            f"--merged needs an adapter that merges into the weights ({mergeable_names()}); "
            f"{adapter} is a {method.card_title(kind)} adapter"
            + (" (--gguf and --serve merge it too)" if serve.any else ""),
            hint="export it without --merged, --gguf or --serve (base/ + adapter/)",
        )
    if requantize_merged and calib is None:
        raise UserError(
            "--requantize needs calibration data: re-quantizing the merged model runs MagR/GPTQ",
            hint="pass --calib FILE (a Math10K .json/.jsonl or a plain-text file)",
        )
    return method, kind


def _write_requantized(
    model, tmp: Path, calib_data, config, device, tokenizer, facts, calib, calib_seq_len: int
):
    """merged-gptq/: the merged model re-quantized, its change of the logits in the card."""
    calib_dtype = default_compute_dtype(device) if device.type == "cuda" else None
    requantized, change = requantize_streamed(
        model, calib_data, config, device=device, calib_dtype=calib_dtype
    )
    save_quantized(requantized, tmp / "merged-gptq", tokenizer)
    facts.requantized = {
        "quantize_config": config.quantization_config(),
        "calibration": f"{sum(len(b) for b in calib_data)} windows of "
        f"{calib_seq_len} tokens from {_calib_name(calib)}",
        "change": change,
    }
    return requantized


def _finish_folder(tmp: Path, facts: CardFacts) -> dict[str, Any]:
    """The model card and the manifest, written last (the manifest covers every other file)."""
    (tmp / "README.md").write_text(model_card(facts), encoding="utf-8")
    manifest = build_manifest(tmp)
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _calib_name(calib: Any) -> str:
    sources = [calib] if isinstance(calib, str | Path) else list(calib)
    return " + ".join(Path(s).name for s in sources)


def _calibration(what: str, tokenizer, base: Path, calib, samples: int, seq_len: int, batch: int):
    """The calibration windows a re-quantization needs (`what` names the flag asking)."""
    if calib is None:
        raise UserError(
            f"{what} needs calibration data: re-quantizing the merged model runs MagR/GPTQ",
            hint="pass --calib FILE (a Math10K .json/.jsonl or a plain-text file)",
        )
    if tokenizer is None:
        raise UserError(f"{what} needs a tokenizer to read --calib; {base} has none")
    return build_calibration_data(tokenizer, calib, samples, seq_len, batch)


def _check_parts_hold_only_ours(folder: OutputFolder, parts: Sequence[str]) -> None:
    """The parts an export writes are replaced whole and must hold exactly what its manifest
    lists: a file of the user's inside one is kept, and the export refused, before any work."""
    foreign = folder.foreign_inside(parts)
    if foreign:
        shown = ", ".join(str(p) for p in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UserError(
            f"{folder.path} holds file(s) `qdiablo export` did not write inside the folders it "
            f"replaces: {shown}",
            hint="move them out (an export's base/, adapter/, merged/ ... hold exactly the files "
            "its manifest lists), then run the same command again",
        )
