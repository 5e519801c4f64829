"""The import structure: layers only point down, no module cycles, `qdiablo --help` stays fast.

Imports are read with `ast` from the source (module level and inside functions alike), so a new
cycle or upward import fails here whether or not it is ever executed. `importlib.import_module`
calls count as imports of their (literal) target; one whose target is computed must be listed in
DYNAMIC_IMPORTS with the reason it never reaches first-party code. Two kinds of import are not
dependencies and are skipped: `if TYPE_CHECKING:` blocks and a package's lazy `__getattr__`.
"""

from __future__ import annotations

import ast
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("quantizers", "qdiablo", "eval")

# Lowest first. A module may import modules of lower layers, and of its own layer only within its
# own top-level package (so eval/ never reaches into qdiablo's adapters, nor they into eval/).
# A module belongs to the layer of its longest matching prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "quantizers: calibration capture, MagR, RTN, GPTQ, coordinate descent, reconstruction, "
        "packing, `QuantLinear`, the GPTQ checkpoint layout, kernels, safetensors read and written "
        "a module at a time, resumable quantization, its own file I/O; it imports nothing from "
        "qdiablo or eval",
        ("quantizers",),
    ),
    (
        "base: user errors, atomic writes and JSON, output folders (markers, what a verb owns, "
        "one writer per folder), what a verb reads (never written into, never loaded unfinished), "
        "operating-system faults as one line, non-finite weights refused by name, sha256, "
        "Math10K records and prompt templates, the flag generator, the base-kind vocabulary, "
        "the export manifest, the library versions a run records, the optional libraries (PEFT, "
        "bitsandbytes) imported without the hub, where a model comes from, the device rule",
        (
            "qdiablo",
            "qdiablo.errors",
            "qdiablo.io",
            "qdiablo.hashing",
            "qdiablo.data",
            "qdiablo.flags",
            "qdiablo.kinds",
            "qdiablo.manifest",
            "qdiablo.optional",
            "qdiablo.sources",
            "qdiablo.devices",
            "qdiablo.outputs",
            "qdiablo.ownership",
            "qdiablo.locks",
            "qdiablo.inputs",
            "qdiablo.faults",
            "qdiablo.health",
            "qdiablo.versions",
        ),
    ),
    (
        "core: the DiaBlo adapter; attaching DiaBlo or PEFT LoRA, budgets, loading a saved "
        "adapter; NF4/NF2 bases; calibration texts; the memory planner; Math10K evaluation",
        (
            "qdiablo.diablo",
            "qdiablo.nf4",
            "qdiablo.nf",
            "qdiablo.calibration",
            "qdiablo.adapters",
            "qdiablo.memory",
            "eval",
        ),
    ),
    (
        "loader: the one way to load a base (`load_base(source, kind)`) or an export; a "
        "full-precision model whose blocks are read from the shards one at a time",
        ("qdiablo.models", "qdiablo.streamed"),
    ),
    (
        "workflows: training settings and runs (sharded FSDP loading included; a diverged run "
        "stopped: `qdiablo.train.health`), the export folder",
        ("qdiablo.train", "qdiablo.export"),
    ),
    (
        "verbs: one module per pipeline step (and the planner), a thin layer over the library",
        (
            "qdiablo.commands",
            "qdiablo.commands.quantize",
            "qdiablo.commands.train",
            "qdiablo.commands.eval",
            "qdiablo.commands.export",
            "qdiablo.commands.plan",
        ),
    ),
    ("pipeline: resumable stage graphs of those verbs", ("qdiablo.pipeline",)),
    (
        "top: the pipeline verbs (run, compare, demo) and the command",
        (
            "qdiablo.commands.run",
            "qdiablo.commands.compare",
            "qdiablo.commands.demo",
            "qdiablo.cli",
            "qdiablo.__main__",
        ),
    ),
]


def layer_table() -> str:
    """The layer map as docs/architecture.md shows it (tests/test_docs.py keeps them equal)."""
    rows = ["| layer | modules | role |", "|---|---|---|"]
    for i, (description, prefixes) in enumerate(LAYERS):
        name, _, role = description.partition(": ")
        rows.append(f"| {i}. {name} | {', '.join(f'`{p}`' for p in prefixes)} | {role} |")
    return "\n".join(rows)


# Modules that call importlib.import_module with a computed name, and why that is no dependency.
DYNAMIC_IMPORTS = {
    "qdiablo.optional": "imports the optional third-party libraries (peft, bitsandbytes) by name",
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(name: str, path: Path) -> list[tuple[str, str, int]]:
    """(imported first-party module, imported name or '', line) for every real import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, str, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, ast.FunctionDef) and child.name == "__getattr__":
                continue  # a package's lazy re-exports
            if _is_import_module_call(child):
                target = child.args[0] if child.args else None
                if isinstance(target, ast.Constant) and isinstance(target.value, str):
                    out.append((target.value, "", child.lineno))
                else:
                    out.append((DYNAMIC, ast.unparse(child), child.lineno))
            if isinstance(child, ast.Import):
                out.extend((a.name, "", child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    out.append(
                        (sub, "", child.lineno) if sub in MODULES else (base, a.name, child.lineno)
                    )
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return [(m, n, line) for m, n, line in out if m.split(".")[0] in PACKAGES or m == DYNAMIC]


DYNAMIC = "<computed>"


def _is_import_module_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name == "import_module"


def test_every_computed_import_is_explained():
    unexplained = [
        f"{path.relative_to(REPO)}:{line} {call}"
        for module, path in MODULES.items()
        for target, call, line in _imports(module, path)
        if target == DYNAMIC and module not in DYNAMIC_IMPORTS
    ]
    assert not unexplained, (
        "import_module with a computed name (give it a literal, or explain it in "
        "DYNAMIC_IMPORTS):\n" + "\n".join(unexplained)
    )


def test_import_module_calls_are_followed(tmp_path):
    """The layer map sees `import_module("qdiablo.x")` as an import of qdiablo.x, and a computed
    name as DYNAMIC."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import importlib\ndef f(name):\n    importlib.import_module('qdiablo.cli')\n"
        "    return importlib.import_module(f'qdiablo.commands.{name}')\n"
    )
    found = _imports("qdiablo.probe", probe)
    assert ("qdiablo.cli", "", 3) in found
    assert any(target == DYNAMIC and line == 4 for target, _, line in found)


def _layer(module: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank >= 0, f"{module} is in no layer: add it to LAYERS"
    return rank


def _with_parents(module: str) -> list[str]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in MODULES]


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_imports_only_point_down():
    upward = []
    for module, path in MODULES.items():
        own = _layer(module)
        for target, _, line in _imports(module, path):
            if target not in MODULES:
                continue
            theirs = _layer(target)
            same_package = target.split(".")[0] == module.split(".")[0]
            if theirs > own or (theirs == own and not same_package):
                upward.append(
                    f"{path.relative_to(REPO)}:{line} imports {target} "
                    f"({LAYERS[theirs][0].split(':')[0]} above {LAYERS[own][0].split(':')[0]})"
                )
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = {
        module: {
            dep
            for target, _, _ in _imports(module, path)
            for dep in _with_parents(target)
            if dep != module and not module.startswith(dep + ".")
        }
        for module, path in MODULES.items()
    }
    # Tarjan's strongly connected components: any component of two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_imported_across_modules():
    private = [
        f"{path.relative_to(REPO)}:{line} imports {target}.{name}"
        for module, path in MODULES.items()
        for target, name, line in _imports(module, path)
        if name.startswith("_") and not name.startswith("__") and target != module
    ]
    assert not private, "private names shared between modules (make them public):\n" + "\n".join(
        private
    )


@pytest.mark.parametrize("package", ["qdiablo.errors", "qdiablo.flags", "quantizers.config"])
def test_light_modules_import_without_torch(package):
    """The base layer and QuantConfig load without torch (so do the CLI's flags)."""
    code = f"import sys, {package}; print('torch' in sys.modules)"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_help_is_fast():
    """`qdiablo --help` must not import torch, transformers or the Trainer (seconds each).

    Measured as the child's CPU time (user + sys), which a busy shared machine does not inflate
    the way it inflates wall time.
    """
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "qdiablo", "--help"], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert out.returncode == 0 and "quantize" in out.stdout, out.stderr
    assert cpu < 3.0, f"`qdiablo --help` took {cpu:.1f} s of CPU ({wall:.1f} s wall)"
