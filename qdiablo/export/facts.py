"""What an export's model card reports, read from its input folders before any model loads: the
base's quantize config and report, the adapter's config, the training run's records, the
evaluation summaries, and notes where those records describe another adapter."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from eval.runner import SUMMARY_FILE
from qdiablo.adapters.method import AdapterMethod
from qdiablo.errors import UserError
from qdiablo.export.card import CardFacts
from qdiablo.hashing import adapter_digest
from qdiablo.inputs import require_finished
from qdiablo.io import read_json
from qdiablo.train.config import CONFIG_FILE, RESULTS_FILE
from qdiablo.versions import library_versions

log = logging.getLogger(__name__)


def _read_train_run(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if not folder.is_dir():
        raise UserError(f"--train-run folder not found: {folder}")
    require_finished(folder, ("train",), what="--train-run")
    config = read_json(folder / CONFIG_FILE, what="training config")
    results = read_json(folder / RESULTS_FILE, what="training results (is the run finished?)")
    return config, results


def _read_eval(folder: Path) -> dict[str, Any]:
    require_finished(folder, ("eval",), what="--eval")
    return read_json(folder / SUMMARY_FILE, what="evaluation summary (run `qdiablo eval` first)")


def _describe(config_json: Mapping[str, Any]) -> str:
    return (
        f"{config_json.get('model_type')}, {config_json.get('num_hidden_layers')} layers, "
        f"hidden {config_json.get('hidden_size')}, vocab {config_json.get('vocab_size')}"
    )


def card_facts(
    base: Path,
    adapter: Path,
    method: AdapterMethod,
    kind: str,
    train_dir: Path | None,
    evals: Sequence[str | Path],
    base_name: str | None,
) -> CardFacts:
    """Everything the card reports that the input folders record (read before any model)."""
    train_config, train_results = _read_train_run(train_dir) if train_dir else (None, None)
    summaries = [(str(e), _read_eval(Path(e))) for e in evals]
    base_entry = read_json(base / "quantize_config.json", what="quantize config")
    base_cfg = read_json(base / "config.json", what="model config")
    report_file = base / "quantization_report.json"
    return CardFacts(
        base_name=base_name or base_entry.get("model_name_or_path") or _unknown_name(train_config),
        architecture=_describe(base_cfg),
        quantize_config=base_entry,
        quant_report=read_json(report_file) if report_file.is_file() else None,
        adapter_kind=kind,
        adapter_config=read_json(adapter / "adapter_config.json", what="adapter config"),
        adapter_method=method.name,
        train_config=train_config,
        train_results=train_results,
        evals=summaries,
        versions=library_versions(),
        notes=_consistency_notes(adapter, train_dir, summaries),
    )


def _unknown_name(train_config: Mapping[str, Any] | None) -> str:
    """`qdiablo quantize` does not record the source model; a training run may name it."""
    model = str((train_config or {}).get("model") or "")
    if model and not Path(model, "quantize_config.json").is_file():
        return model
    return "unknown (not recorded in base/: pass --base-model-name)"


def _consistency_notes(
    adapter: Path, train_dir: Path | None, evals: Sequence[tuple[str, Mapping[str, Any]]]
) -> list[str]:
    """Warn (and say in the card) when the records given describe another adapter."""
    notes = []
    digest = adapter_digest(adapter)
    trained = train_dir / "adapter" if train_dir else None
    if (
        trained is not None
        and trained.resolve() != adapter.resolve()
        and (not trained.is_dir() or adapter_digest(trained) != digest)
    ):
        notes.append(f"the training records ({train_dir}) are for another adapter than this one")
    for name, summary in evals:
        recorded = (summary.get("model") or {}).get("adapter_sha256")
        if recorded is not None and recorded != digest:
            notes.append(f"the scores of {name} were measured with another adapter than this one")
    for note in notes:
        log.warning("%s", note)
    return notes
