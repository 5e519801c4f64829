"""The adapter registry: a new method is one class and one registration.

`DiagMethod` below (y = W x + d ⊙ x on square layers, d zero-initialised) is defined in this file
alone, with no edit anywhere else, and goes the whole way: attach → a few steps of the train
library entry on a tiny packed base → save → the adapter loader → export --merged → reload
(docs/architecture.md, "Add an adapter"). A second test checks that no module outside an
adapter's own files branches on an adapter's name.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, make_tokenizer
from safetensors.torch import load_file, save_file
from torch import nn

from qdiablo.adapters.common import adapted_layers
from qdiablo.adapters.loading import load_adapter
from qdiablo.adapters.method import AdapterMethod
from qdiablo.adapters.registry import (
    ADAPTER_CHOICES,
    BUILTIN,
    get_adapter,
    method_of,
    methods,
    register_adapter,
    unregister_adapter,
)
from qdiablo.errors import UserError
from qdiablo.io import check_adapter_tensors, read_json
from quantizers import QuantConfig, QuantLinear, load_quantized, quantize_model, save_quantized
from quantizers.calibration import tokenize_calibration

REPO = Path(__file__).resolve().parents[1]
TEXT = "Natalia sold clips to 48 of her friends in April, and half as many clips in May.\n\n"
TARGETS = ["q_proj", "o_proj"]  # the square layers of the tiny LLaMA (64 → 64)

# ---- the toy adapter: everything it needs is below ----------------------------------------------


class DiagLinear(nn.Module):
    """A square layer plus a zero-initialised diagonal: y = base(x) + d ⊙ x."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.diag = nn.Parameter(torch.zeros(self.in_features, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + x * self.diag.to(x.dtype)


class DiagModel(nn.Module):
    """The adapted model; attribute lookups fall through to the wrapped causal LM."""

    def __init__(self, model: nn.Module, layers: list[str]):
        super().__init__()
        self.model = model
        self.layers = layers
        for p in model.parameters():
            p.requires_grad_(False)
        for name in layers:
            model.set_submodule(name, DiagLinear(model.get_submodule(name)))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def diagonals(self) -> dict[str, nn.Parameter]:
        return {f"{n}.diag": self.model.get_submodule(n).diag for n in self.layers}


class DiagMethod(AdapterMethod):
    name = "toy-diag"
    title = "Diagonal"
    config_class = dict
    default_lr = 1e-2
    mergeable = True

    def check(self, shapes, config) -> None:
        for name, (fin, fout) in shapes.items():
            if fin != fout:
                raise UserError(f"toy-diag needs square layers; '{name}' is {fin}→{fout}")

    def trainable_count(self, shapes, budget) -> int:
        return sum(fin for fin, _ in shapes)

    def attach(self, model, targets, budget, config) -> DiagModel:
        return DiagModel(model, [layer.name for layer in adapted_layers(model, targets)])

    def owns(self, model) -> bool:
        return isinstance(model, DiagModel)

    def base_model(self, model):
        return model.model

    def save(self, model, folder, gathered) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in model.diagonals().items()}
        save_file(tensors, folder / "adapter_model.safetensors")
        config = {"method": self.name, "layers": model.layers}
        (folder / "adapter_config.json").write_text(json.dumps(config))

    def load_weights(self, model, folder) -> None:
        tensors = load_file(folder / "adapter_model.safetensors")
        shapes = {k: tuple(v.shape) for k, v in model.diagonals().items()}
        check_adapter_tensors(folder / "adapter_model.safetensors", shapes, tensors)
        with torch.no_grad():
            for key, param in model.diagonals().items():
                param.copy_(tensors[key])

    def recognizes(self, config):
        return self.name if config.get("method") == self.name else None

    def load(self, model, folder, kind, *, force=False) -> DiagModel:
        wrapped = DiagModel(model, read_json(folder / "adapter_config.json")["layers"])
        self.load_weights(wrapped, folder)
        return wrapped

    def merged_layer(self, module, dtype):
        if not isinstance(module, DiagLinear):
            return None
        base = module.base_layer
        if isinstance(base, QuantLinear):
            weight = base.dequantize_weight(torch.float32)
        else:
            weight = base.weight.float()
        linear = nn.Linear(module.in_features, module.out_features, bias=False)
        linear.weight.data = (weight + torch.diag(module.diag.detach().float())).to(dtype)
        return linear


# ---- the walk through every verb's library entry ------------------------------------------------


@pytest.fixture
def toy():
    method = register_adapter(DiagMethod())
    yield method
    unregister_adapter(method.name)


@pytest.fixture(scope="module")
def packed_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-base")
    tokenizer = make_tokenizer()
    calib = tokenize_calibration(tokenizer, [TEXT * 20], num_samples=4, seq_len=32)
    model = make_tiny_llama(seed=0)
    save_quantized(
        quantize_model(model, calib, QuantConfig(bits=4, group_size=32)), root, tokenizer
    )
    return root


def _dense_reference(base: Path, diagonals: dict[str, torch.Tensor]) -> nn.Module:
    """The base dequantized into plain float32 layers, each adapted weight W + diag(d) trainable:
    full fine-tuning's model at the toy's current point."""
    model = load_quantized(base)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=False)
            linear.weight.data = module.dequantize_weight(torch.float32).clone()
            model.set_submodule(name, linear)
    for p in model.parameters():
        p.requires_grad_(False)
    for key, d in diagonals.items():
        layer = model.get_submodule(key.removesuffix(".diag"))
        layer.weight.data += torch.diag(d.detach())
        layer.weight.requires_grad_(True)
    return model.eval()


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def test_a_toy_adapter_trains_saves_loads_and_exports_merged(toy, packed_base, math_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from qdiablo.export import export_model, load_exported
    from qdiablo.train import TrainConfig, train

    assert "toy-diag" in ADAPTER_CHOICES  # `--adapter`'s choices come from the registry
    config = TrainConfig(
        model=str(packed_base),
        base="gptq",
        adapter="toy-diag",
        target_modules=TARGETS,
        data=[str(math_file)],
        decontaminate=["none"],
        max_length=256,
        batch_size=4,
        max_steps=3,
        warmup=0,
        save_steps=0,
        logging_steps=1,
        progress=False,
        output=str(tmp_path / "train"),
    )
    assert config.learning_rate == DiagMethod.default_lr
    run = train(config)
    trained = run.model.eval()
    assert method_of(trained) is toy
    diagonals = trained.diagonals()
    assert len(diagonals) == 4  # q_proj and o_proj in each of the 2 decoder layers
    assert run.results["trainable_parameters"] == 4 * 64 and run.results["other_method"] is None
    assert run.results["global_step"] == 3
    assert all(d.abs().max() > 0 for d in diagonals.values())  # training moved every diagonal

    # The toy's gradient is full fine-tuning's gradient restricted to its parameters: d feeds
    # W + diag(d), so ∂L/∂d = diag(∂L/∂W) of the dense model at the same point.
    ids = torch.tensor([[1, 72, 101, 108, 108, 111, 44, 32, 50, 43, 51, 61, 52, 10]])
    for d in diagonals.values():
        d.requires_grad_(True)
        d.grad = None
    _loss(trained, ids).backward()
    dense = _dense_reference(packed_base, diagonals)
    _loss(dense, ids).backward()
    for key, d in diagonals.items():
        full = dense.get_submodule(key.removesuffix(".diag")).weight.grad
        assert d.grad.abs().max() > 0
        torch.testing.assert_close(d.grad, full.diagonal(), rtol=1e-4, atol=1e-7)

    # Save/load bit for bit: the files hold the trained tensors, the loader restores them.
    saved = load_file(run.adapter_dir / "adapter_model.safetensors")
    assert saved.keys() == diagonals.keys()
    assert all(torch.equal(saved[k], d.detach()) for k, d in diagonals.items())
    loaded = load_adapter(load_quantized(packed_base), run.adapter_dir)
    assert isinstance(loaded, DiagModel) and not loaded.training
    assert all(torch.equal(loaded.diagonals()[k], d) for k, d in diagonals.items())
    with torch.no_grad():
        adapted = trained(input_ids=ids).logits
        assert torch.equal(loaded(input_ids=ids).logits, adapted)

    # Export: base/ + adapter/ reload to the same model; merged/ (W + diag(d), dequantized W)
    # is a plain transformers model with the adapted model's logits.
    out = export_model(packed_base, run.adapter_dir, tmp_path / "export", merged=True,
                       merged_dtype="float32")  # fmt: skip
    with torch.no_grad():
        assert torch.equal(load_exported(out)(input_ids=ids).logits, adapted)
        merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
        assert not any(isinstance(m, DiagLinear | QuantLinear) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
    assert "Diagonal adapter" in (out / "README.md").read_text()


def test_the_registry_refuses_what_it_cannot_use(toy):
    with pytest.raises(ValueError, match="already registered"):
        register_adapter(DiagMethod())
    with pytest.raises(UserError, match="unknown adapter 'nope'"):
        get_adapter("nope")
    with pytest.raises(ValueError, match="built in"):
        unregister_adapter("diablo")
    with pytest.raises(TypeError, match="no registered adapter"):
        method_of(nn.Linear(2, 2))


def test_the_builtin_names_are_the_builtin_methods():
    assert tuple(m.name for m in methods() if m.name in BUILTIN) == BUILTIN
    assert [m.name for m in methods()][: len(BUILTIN)] == list(BUILTIN)


# ---- no module outside an adapter's own files branches on an adapter's name ---------------------

# An adapter's own modules, and the registry that names the built-in ones.
OWN = {
    "qdiablo/adapters/diablo.py",
    "qdiablo/adapters/lora.py",
    "qdiablo/adapters/registry.py",
}
OWN_PACKAGES = ("qdiablo/diablo/",)  # DiaBlo itself
ADAPTER_TYPES = {"DiaBloModel", "DiaBloLinear", "PeftModel", "LoraModel", "is_peft_model"}


def _names_in(node: ast.AST) -> set[str]:
    """String constants compared against: `x == "lora"`, `x in ("diablo", "lora")`."""
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            found.add(sub.value)
    return found


def branches_on_adapter_names(path: Path, names: set[str]) -> list[str]:
    """Where `path` compares with an adapter's name, keys a dict by one, or tests a model's type
    against an adapter's classes."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_names_in(o) & names for o in operands):
                hits.append(f"{where}:{node.lineno} {ast.unparse(node)}")
        elif isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
            if keys & names:
                hits.append(f"{where}:{node.lineno} a dict keyed by {keys & names}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in {"isinstance", "type"}:
            used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            used |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
            if used & ADAPTER_TYPES:
                hits.append(f"{where}:{node.lineno} {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in ADAPTER_TYPES:
            hits.append(f"{where}:{node.lineno} {ast.unparse(node)}")
    return hits


def test_no_module_outside_an_adapter_branches_on_its_name():
    names = set(BUILTIN) | {"DiaBlo", "LoRA"}
    hits = []
    for package in ("qdiablo", "eval", "quantizers"):
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel in OWN or rel.startswith(OWN_PACKAGES):
                continue
            hits += branches_on_adapter_names(path, names)
    assert not hits, "branching on an adapter's name (ask its AdapterMethod):\n" + "\n".join(hits)


def test_the_branch_check_can_fail(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        'def f(cfg, model):\n    if cfg.adapter == "lora":\n        pass\n'
        '    lr = {"diablo": 1.0}\n    return isinstance(model, DiaBloModel)\n'
    )
    hits = branches_on_adapter_names(probe, set(BUILTIN))
    assert [h.split(" ")[0].rsplit(":", 1)[1] for h in hits] == ["2", "4", "5"]
