"""docs/architecture.md's tables are the code's: the import-layer map (tests/test_layers.py) and
the default DiaBlo/LoRA targets per architecture (qdiablo/diablo/targets.py). When one fails,
paste the table it prints into the doc."""

from pathlib import Path

from test_layers import layer_table

from qdiablo.diablo.targets import DEFAULT_TARGETS_BY_MODEL_TYPE

ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def targets_table() -> str:
    """One row per distinct target tuple, its model types in the mapping's order."""
    by_targets: dict[tuple[str, ...], list[str]] = {}
    for model_type, targets in DEFAULT_TARGETS_BY_MODEL_TYPE.items():
        by_targets.setdefault(targets, []).append(model_type)
    rows = ["| model types | default targets |", "|---|---|"]
    for targets, types in by_targets.items():
        rows.append(f"| {', '.join(types)} | `{', '.join(targets)}` |")
    return "\n".join(rows)


def test_the_layer_table_is_the_layer_map():
    table = layer_table()
    assert table in ARCHITECTURE.read_text(), f"docs/architecture.md should hold:\n{table}"


def test_the_default_targets_table_is_targets_py():
    table = targets_table()
    assert table in ARCHITECTURE.read_text(), f"docs/architecture.md should hold:\n{table}"
