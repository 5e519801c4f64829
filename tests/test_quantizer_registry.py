"""A quantizer is one registration: a toy method defined in this file alone ("floor": the min-max
grid with codes rounded down instead of to the nearest) goes through `qdiablo quantize
--method floor` → `load_base(kind="floor")` → a DiaBlo training step on `--base floor` →
`qdiablo export` (re-quantizing the merge with it too) → reloading the export.

docs/architecture.md's recipe "add a quantizer" points here: nothing outside this file knows
the toy's name."""

from __future__ import annotations

import filecmp
import json

import pytest
import torch
from safetensors.torch import load_file

from qdiablo import cli
from qdiablo.adapters.loading import load_adapter
from qdiablo.errors import UserError
from qdiablo.export import load_exported
from qdiablo.models import load_base, load_model
from qdiablo.outputs import is_bookkeeping
from quantizers import QuantConfig, QuantLinear, load_quantized
from quantizers.registry import (
    QuantMethod,
    needs_calibration,
    register_method,
    unregister_method,
)
from quantizers.rtn import MIN_SCALE, QuantResult, rtn_quantize

TEXT = "Natalia sold clips to 48 of her friends in April, and half as many clips in May.\n\n"
IDS = torch.tensor([[1, 72, 101, 108, 108, 111, 44, 32, 50, 43, 51, 61]])


def floor_quantize(W: torch.Tensor, H, config: QuantConfig, name: str) -> QuantResult:
    """Asymmetric min-max grid per (row, group), fp16-exact scales, codes = floor(w/s) + z."""
    del H, name
    W = W.float()
    rows, cols = W.shape
    g = cols if config.group_size == -1 else config.group_size
    maxq = 2**config.bits - 1
    Wg = W.view(rows, cols // g, g)  # the toy model's widths are whole groups
    lo, hi = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)
    scale = ((hi - lo) / maxq).clamp(min=MIN_SCALE).half().float()
    zero = torch.round(-lo / scale).clamp(0, maxq)
    codes = torch.floor(Wg / scale[..., None]) + zero[..., None]
    codes = codes.clamp(0, maxq).reshape(rows, cols).to(torch.uint8)
    g_idx = (torch.arange(cols) // g).to(torch.int32)
    return QuantResult(codes, scale.t().contiguous(), zero.t().to(torch.int32), g_idx, config.bits)


@pytest.fixture
def floor_method():
    method = register_method(
        QuantMethod(
            name="floor",
            help="min-max grid, codes rounded down",
            quantize=floor_quantize,
            bits=(2, 3, 4),
            sym=(False,),
        )
    )
    yield method
    unregister_method("floor")


def _float_weights(model) -> dict[str, torch.Tensor]:
    return {
        n: m.weight.detach().float()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in n
    }


def _expected(weights: dict[str, torch.Tensor], config: QuantConfig) -> dict[str, torch.Tensor]:
    return {n: floor_quantize(w, None, config, n).dequantize() for n, w in weights.items()}


def _assert_packs(model, expected: dict[str, torch.Tensor]) -> None:
    """Every packed layer dequantizes to the toy's own codes × scales, bit for bit."""
    packed = {_key(n): m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    expected = {_key(n): w for n, w in expected.items()}
    assert sorted(packed) == sorted(expected)
    for n, layer in packed.items():
        assert torch.equal(layer.dequantize_weight(), expected[n]), n


def _key(name: str) -> str:
    """`layers.0.mlp.up_proj`, whether the layer sits in a bare model or under an adapter."""
    return name.removesuffix(".base_layer")[name.index("layers.") :]


def test_config_reads_the_registry(floor_method):
    assert QuantConfig(method="floor", bits=3).method == "floor"
    assert not needs_calibration(QuantConfig(method="floor"))
    assert needs_calibration(QuantConfig(method="floor", magr=True))  # MagR's own declaration
    with pytest.raises(ValueError, match="method 'floor' supports bits 2, 3, 4"):
        QuantConfig(method="floor", bits=8)
    with pytest.raises(ValueError, match="method 'floor' writes only asymmetric"):
        QuantConfig(method="floor", sym=True)
    with pytest.raises(ValueError, match="apply to method 'gptq' only"):
        QuantConfig(method="floor", desc_act=True)
    unregister_method("floor")
    with pytest.raises(ValueError, match="expected 'gptq' or 'rtn', got 'floor'"):
        QuantConfig(method="floor")


def test_a_toy_quantizer_from_quantize_to_a_reloaded_export(
    floor_method, tiny_model_dir, math_file, tmp_path, capsys
):
    config = QuantConfig(method="floor", bits=4, group_size=32)
    original = _float_weights(load_model(str(tiny_model_dir)))
    expected = _expected(original, config)
    # the toy really is not RTN: some codes round down where RTN rounds up
    assert any(
        not torch.equal(rtn_quantize(w, 4, 32).dequantize(), expected[n])
        for n, w in original.items()
    )

    # quantize: the CLI's --method takes the toy; no calibration data is needed or read
    base = tmp_path / "base"
    argv = ["quantize", "--model", str(tiny_model_dir), "--output", str(base)]
    argv += ["--method", "floor", "--bits", "4", "--group-size", "32"]
    assert cli.main(argv) == 0
    assert "quantized 14 layers to 4 bits (group size 32, floor)" in capsys.readouterr().out
    qc = json.loads((base / "quantize_config.json").read_text())
    assert (qc["quant_method"], qc["meta"]["qdiablo"]["method"]) == ("gptq", "floor")

    # load: the toy's name is a base kind; another method's kind is refused
    _assert_packs(load_base(str(base), "floor"), expected)
    with pytest.raises(UserError, match="quantized with floor"):
        load_base(str(base), "rtn")

    # one DiaBlo training step on --base floor: the adapter moves, the packed base does not
    run = tmp_path / "train"
    argv = ["train", "--model", str(base), "--base", "floor", "--data", str(math_file)]
    argv += ["--decontaminate", "none", "--num-blocks", "8", "--max-steps", "1", "--lr", "1e-2"]
    argv += ["--batch-size", "4", "--max-length", "256", "--save-steps", "0", "--warmup", "0"]
    argv += ["--output", str(run), "--no-progress"]
    assert cli.main(argv) == 0
    results = json.loads((run / "train_results.json").read_text())
    assert (results["base"], results["global_step"]) == ("floor", 1)
    blocks = load_file(run / "adapter" / "adapter_model.safetensors")
    assert blocks and any(t.abs().max() > 0 for t in blocks.values())  # DiaBlo starts at zero
    trained = load_adapter(load_quantized(base), run / "adapter")
    _assert_packs(trained, expected)

    # export, re-quantizing the merge with the toy too
    out = tmp_path / "export"
    argv = ["export", "--base", str(base), "--train-run", str(run), "--output", str(out)]
    argv += ["--requantize", "--merged-dtype", "float32", "--method", "floor", "--no-magr"]
    argv += ["--calib", str(_calib(tmp_path)), "--calib-samples", "4", "--calib-seq-len", "32"]
    assert cli.main(argv) == 0

    # reload: base/ is the quantize output byte for byte, and the export computes what the
    # trained model computes, bit for bit
    names = sorted(p.name for p in base.iterdir() if not is_bookkeeping(p.name))
    assert filecmp.cmpfiles(base, out / "base", names, shallow=False)[0] == names
    _assert_packs(load_base(str(out / "base"), "floor"), expected)
    loaded = load_exported(out)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, trained(input_ids=IDS).logits)
    # merged-gptq/: the merge quantized by the toy, its codes × scales again
    merged = _float_weights(load_model(str(out / "merged")))
    requant = load_base(str(out / "merged-gptq"), "floor")
    _assert_packs(requant, _expected(merged, config))
    assert cli.main(["export", "--verify", str(out)]) == 0


def test_the_prepare_hook_sees_each_input_group_and_its_hessian_is_the_one_used(tiny_llama):
    """A method's `prepare` hook (where AWQ would fold scales into the previous layer) runs once
    per group of layers sharing an input, before they are quantized; the method quantizes the
    layers as the hook left them, with the Hessian the hook returned."""
    seen, given, received = [], [], []

    def prepare(block, layers, H, config):
        seen.append(sorted(layers))
        given.append(H.clone())
        for lin in layers.values():
            lin.weight.data.mul_(2)
        return H + torch.eye(H.shape[0])

    def quantize(W, H, config, name):
        received.append(H)
        return floor_quantize(W, None, config, name)

    method = QuantMethod("prep", "", quantize, needs_calibration=True, prepare=prepare)
    register_method(method)
    try:
        from quantizers import quantize_model

        config = QuantConfig(method="prep", bits=4, group_size=32)
        doubled = {n: 2 * w for n, w in _float_weights(tiny_llama).items()}
        quantize_model(tiny_llama, [torch.randint(5, 200, (2, 16))], config)
    finally:
        unregister_method("prep")
    attn, mlp = ("self_attn.", "mlp.")
    groups = [[attn + "k_proj", attn + "q_proj", attn + "v_proj"], [attn + "o_proj"]]
    groups += [[mlp + "gate_proj", mlp + "up_proj"], [mlp + "down_proj"]]
    assert seen == groups * 2  # two blocks, in true_sequential order
    assert len(received) == len(given) == 8
    for H, H_prepared in zip(given, received):
        assert torch.equal(H_prepared, H + torch.eye(H.shape[0]))
    _assert_packs(tiny_llama, _expected(doubled, config))


def _calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT * 30)
    return path
