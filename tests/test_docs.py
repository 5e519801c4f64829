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


def quantizer_table() -> str:
    """The registered quantizers and the steps around them (quantizers/registry.py)."""
    from quantizers.registry import STAGES, methods, registered_steps

    rows = [
        "| method | needs calibration | bits | act-order | `prepare` hook |",
        "|---|---|---|---|---|",
    ]
    yes = {True: "yes", False: "no"}
    for m in methods():
        bits = ", ".join(map(str, m.bits))
        rows.append(
            f"| {m.name} | {yes[m.needs_calibration]} | {bits} | {yes[m.act_order]} "
            f"| {yes[m.prepare is not None]} |"
        )
    rows += ["", "| step | stage | needs calibration |", "|---|---|---|"]
    for stage in STAGES:
        for s in registered_steps(stage):
            rows.append(f"| {s.name} | {stage} | {yes[s.needs_calibration]} |")
    return "\n".join(rows)


def kernel_table() -> str:
    """The registered kernel backends (quantizers/kernels/backends.py)."""
    from quantizers.kernels.backends import all_backends

    rows = ["| backend | bits | devices | dtypes | `auto` up to rows |", "|---|---|---|---|---|"]
    for b in all_backends():
        dtypes = ", ".join(str(d).removeprefix("torch.") for d in b.dtypes)
        rows.append(
            f"| {b.name} | {', '.join(map(str, b.bits))} | {', '.join(b.devices)} | {dtypes} "
            f"| {'any' if b.max_rows is None else b.max_rows} |"
        )
    return "\n".join(rows)


def test_the_quantizer_table_is_the_registry():
    table = quantizer_table()
    assert table in ARCHITECTURE.read_text(), f"docs/architecture.md should hold:\n{table}"


def test_the_kernel_table_is_the_registered_backends():
    table = kernel_table()
    assert table in ARCHITECTURE.read_text(), f"docs/architecture.md should hold:\n{table}"
