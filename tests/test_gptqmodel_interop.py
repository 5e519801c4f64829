"""benchmarks/gptqmodel_interop.py on a tiny model: the export half writes qdiablo's exact
per-layer weights, the identity probe reads a layer's weight exactly, and the per-layer comparison
holds fp16 precision. GPTQModel's half runs only where gptqmodel is importable (its own venv)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantizers import QuantLinear, load_quantized

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "gptqmodel_interop", ROOT / "benchmarks" / "gptqmodel_interop.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


interop = _load_script()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("interop")
    interop.export(out, "tiny", [4], ["gptq_v2"], 64, False)
    interop.export(out, "tiny", [4], ["gptq_v2"], 64, False, trained_scales=True)
    return out


def _unpack_4bit(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """GPTQ 4-bit unpacking written out: 8 codes per int32 along `dim`, lowest bits first."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    if dim == 0:
        codes = (packed.unsqueeze(1) >> shifts.view(1, 8, 1)) & 15
        return codes.reshape(-1, packed.shape[1])
    codes = (packed.unsqueeze(2) >> shifts.view(1, 1, 8)) & 15
    return codes.reshape(packed.shape[0], -1)


@pytest.mark.parametrize("folder_name", ["w4-gptq_v2", "w4-gptq_v2-scales"])
def test_reference_holds_the_weights_of_the_saved_tensors(exported, folder_name):
    """A plain GPTQ reading of the saved tensors is what qdiablo computes, trained scales folded
    into the base included."""
    folder = exported / folder_name
    ref = load_file(str(interop.reference_file(folder)))
    saved = load_file(str(folder / "model.safetensors"))
    names = sorted(k[: -len(".qweight")] for k in saved if k.endswith(".qweight"))
    assert sorted(k[len(interop.WEIGHT_PREFIX) :] for k in ref if "::" in k) == names
    assert len(names) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    for name in names:
        codes = _unpack_4bit(saved[f"{name}.qweight"], 0)  # [in, out]
        zeros = _unpack_4bit(saved[f"{name}.qzeros"], 1)  # [groups, out], v2: as stored
        g = saved[f"{name}.g_idx"].long()
        w = (codes - zeros[g]).float() * saved[f"{name}.scales"].float()[g]
        assert torch.equal(ref[interop.WEIGHT_PREFIX + name], w.t().half()), name


def test_trained_scales_folder_differs_only_in_its_scales(exported):
    plain = load_file(str(exported / "w4-gptq_v2" / "model.safetensors"))
    scaled = load_file(str(exported / "w4-gptq_v2-scales" / "model.safetensors"))
    assert plain.keys() == scaled.keys()
    for key in plain:
        same = torch.equal(plain[key], scaled[key])
        assert same != key.endswith(".scales"), key  # every scales tensor moved, nothing else


def test_probe_reads_each_layer_exactly_and_logits_are_qdiablos(exported):
    folder = exported / "w4-gptq_v2"
    ref = load_file(str(interop.reference_file(folder)))
    model = load_quantized(folder).eval()
    with torch.no_grad():
        assert torch.equal(model(ref["ids"]).logits[0], ref["logits_fp32"])
    model.half()
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            probed = interop.probe_weight(layer, layer.in_features, torch.float16, "cpu")
            result = interop.compare_weights(ref[interop.WEIGHT_PREFIX + name], probed)
            assert result["bit_identical"] and result["within_fp16"], name


def test_compare_weights_allows_one_fp16_ulp_and_no_more():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0)).half()
    one_ulp = torch.nextafter(w, torch.full_like(w, torch.inf))
    same = interop.compare_weights(w, w.clone())
    assert same["bit_identical"] and same["within_fp16"] and same["max_abs_diff"] == 0
    near = interop.compare_weights(w, one_ulp)
    assert near["within_fp16"] and not near["bit_identical"]
    off = w.clone()
    off[3, 5] = off[3, 5] * 1.01 + 1e-3
    far = interop.compare_weights(w, off)
    assert not far["within_fp16"] and far["outside"] == 1
    assert not interop.compare_weights(w, w.t())["within_fp16"]


def test_gptqmodel_loads_v2_with_qdiablos_weights(exported):
    pytest.importorskip("gptqmodel")
    summary = exported / "summary.json"
    assert interop.check(exported, "cpu", "TORCH", None, summary) == 0
    rows = json.loads(summary.read_text())
    assert len(rows) == 2  # the plain base and the one with trained scales folded in
    for row in rows:
        assert row["outcome"] == "match" and row["layers_within_fp16"] == row["layers"] == 14
