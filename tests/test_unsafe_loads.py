"""No code path deserialises with pickle: every `torch.load` passes `weights_only=True`, and
there is no `pickle`, `yaml.load` (only `yaml.safe_load`) or `trust_remote_code=True`."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("qdiablo", "quantizers", "eval", "benchmarks", "examples", "tests")


def _python_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (REPO / folder).rglob("*.py"))


def _name(node: ast.AST) -> str:
    """Dotted name of a call target: `torch.load`, `yaml.load`, `pickle.loads`, ..."""
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def unsafe_uses(source: str, filename: str = "<string>") -> list[str]:
    """Each unsafe load in `source`, as 'line N: what'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            for name in names:
                if name.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle"):
                    found.append(f"line {node.lineno}: imports {name}")
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if name.endswith("torch.load"):
            value = keywords.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append(f"line {node.lineno}: {name} without weights_only=True")
        if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            found.append(f"line {node.lineno}: {name} (use yaml.safe_load)")
        value = keywords.get("trust_remote_code")
        if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
            found.append(f"line {node.lineno}: trust_remote_code={ast.unparse(value)}")
    return found


def test_the_checker_catches_each_kind():
    bad = (
        "import pickle\nimport torch, yaml\nfrom transformers import AutoModel\n"
        "torch.load(f)\ntorch.load(f, weights_only=False)\nyaml.load(s)\n"
        "AutoModel.from_pretrained(p, trust_remote_code=True)\n"
    )
    assert len(unsafe_uses(bad)) == 5
    good = "import torch, yaml\ntorch.load(f, weights_only=True)\nyaml.safe_load(s)\n"
    assert unsafe_uses(good) == []


def test_the_tree_has_no_unsafe_loads():
    files = _python_files()
    assert len(files) > 50  # the walk found the tree
    problems = [
        f"{p.relative_to(REPO)}: {use}"
        for p in files
        if p.name != "test_unsafe_loads.py"
        for use in unsafe_uses(p.read_text(encoding="utf-8"), str(p))
    ]
    assert problems == []
