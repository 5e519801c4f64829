"""Training on packed GPTQ-layout bases (quantizers.QuantLinear): DiaBlo's block gradients and
GPTQ-LoRA against PEFT's LoRA on nn.Linear layers holding the same dequantized weights, the
`--base rtn/gptq` path end to end, and the 2-bit vs 4-bit resident bytes."""

import pytest
import torch
from conftest import make_tiny_llama, make_tokenizer
from torch import nn

from qdiablo import DiaBloConfig, DiaBloModel, get_diablo_model
from qdiablo.adapters.lora import attach_lora, load_lora
from qdiablo.errors import UserError
from qdiablo.train import TrainConfig, train
from qdiablo.train.bases import load_training_base
from qdiablo.train.metrics import base_linear_bytes
from quantizers import QuantConfig, QuantLinear, quantize_model, save_quantized

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def quantized_tiny(bits: int = 4, seed: int = 3, group_size: int = 32):
    model = make_tiny_llama(seed=seed)
    return quantize_model(model, None, QuantConfig(method="rtn", bits=bits, group_size=group_size))


def dequantized_twin(packed: nn.Module, seed: int = 3) -> nn.Module:
    """The same model with each QuantLinear replaced by an nn.Linear holding its dequantized W."""
    dense = make_tiny_llama(seed=seed)
    for name, m in packed.named_modules():
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = m.dequantize_weight().contiguous()
            lin.weight.requires_grad_(False)
            dense.set_submodule(name, lin)
    return dense


def test_diablo_gradients_on_quantlinear_equal_those_on_dequantized_linear():
    packed = quantized_tiny(bits=3)
    dense = dequantized_twin(packed)
    config = DiaBloConfig(num_blocks=8, dropout=0.0)
    pd, dd = get_diablo_model(packed, config), get_diablo_model(dense, config)
    torch.manual_seed(0)
    for (_, a), (_, b) in zip(pd.diablo_layers(), dd.diablo_layers()):
        blocks = torch.randn_like(a.blocks) * 0.05
        a.blocks.data.copy_(blocks)
        b.blocks.data.copy_(blocks)
    ids = torch.randint(0, 250, (2, 20))
    qweights = {
        n: m.packed_tensors().qweight.clone()
        for n, m in packed.named_modules()
        if isinstance(m, QuantLinear)
    }
    loss_p, loss_d = pd(input_ids=ids, labels=ids).loss, dd(input_ids=ids, labels=ids).loss
    loss_p.backward()
    loss_d.backward()
    torch.testing.assert_close(loss_p, loss_d, atol=1e-5, rtol=1e-5)
    for (name, a), (_, b) in zip(pd.diablo_layers(), dd.diablo_layers()):
        assert isinstance(a.base_layer, QuantLinear)
        assert a.blocks.grad.abs().sum() > 0
        torch.testing.assert_close(a.blocks.grad, b.blocks.grad, atol=1e-6, rtol=1e-4, msg=name)
    for name, m in packed.named_modules():
        if isinstance(m, QuantLinear):
            qweight = m.packed_tensors().qweight
            assert torch.equal(qweight, qweights[name]) and qweight.dtype == torch.int32
            assert all(not p.requires_grad and p.grad is None for p in m.parameters())


def test_gptq_lora_equals_peft_lora_on_dequantized_linear():
    GPTQLoraLinear = pytest.importorskip("peft.tuners.lora.gptq").GPTQLoraLinear
    packed = quantized_tiny(bits=4)
    dense = dequantized_twin(packed)
    torch.manual_seed(7)
    lp = attach_lora(packed, rank=4, alpha=8, target_modules=TARGETS, dropout=0.0)
    torch.manual_seed(7)
    ld = attach_lora(dense, rank=4, alpha=8, target_modules=TARGETS, dropout=0.0)
    q = lp.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, GPTQLoraLinear) and isinstance(q.base_layer, QuantLinear)
    params_p = dict((n, p) for n, p in lp.named_parameters() if p.requires_grad)
    params_d = dict((n, p) for n, p in ld.named_parameters() if p.requires_grad)
    assert params_p.keys() == params_d.keys() and len(params_p) == 2 * 10
    torch.manual_seed(1)
    for name, p in params_p.items():  # B is zero at init: give both the same non-zero B
        torch.testing.assert_close(p, params_d[name], atol=0, rtol=0)
        if "lora_B" in name:
            b = torch.randn_like(p) * 0.05
            p.data.copy_(b)
            params_d[name].data.copy_(b)
    ids = torch.randint(0, 250, (2, 20))
    out_p, out_d = lp(input_ids=ids, labels=ids), ld(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_p.logits, out_d.logits, atol=1e-5, rtol=1e-5)
    out_p.loss.backward()
    out_d.loss.backward()
    for name, p in params_p.items():
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, params_d[name].grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def rtn_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rtn4") / "model"
    save_quantized(quantized_tiny(bits=4, seed=0), folder, make_tokenizer())
    return folder


@pytest.mark.parametrize("adapter", ["diablo", "lora"])
def test_training_on_a_packed_folder(tmp_path, rtn_folder, math_file, adapter):
    if adapter == "lora":
        pytest.importorskip("peft")
    cfg = TrainConfig(
        model=str(rtn_folder),
        base="rtn",
        adapter=adapter,
        num_blocks=8,
        rank=4,
        data=[str(math_file)],
        decontaminate=["none"],
        max_length=256,
        batch_size=4,
        max_steps=6,
        lr=2e-2,
        warmup=0,
        save_steps=3,
        logging_steps=1,
        gradient_checkpointing=True,
        progress=False,
        output=str(tmp_path / "run"),
    )
    result = train(cfg)
    res = result.results
    assert res["last_logged_loss"] < res["first_logged_loss"] - 0.05
    assert "packed rtn 4-bit g32" in res["base_description"]
    # the base stayed packed: every targeted layer still wraps a QuantLinear with int32 codes
    layers = [m for m in result.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(
        m.packed_tensors().qweight.dtype == torch.int32 for m in layers
    )
    assert res["base_linear_layers"]["layers"] == 14
    assert res["base_linear_layers"]["bytes"] < 0.25 * 4 * res["base_linear_layers"]["weights"]
    # the saved adapter reloads onto a freshly loaded packed base and gives the same model
    fresh_base = load_training_base("rtn", str(rtn_folder)).model
    if adapter == "diablo":
        fresh = DiaBloModel.from_pretrained(fresh_base, result.adapter_dir)
    else:
        fresh = load_lora(fresh_base, str(result.adapter_dir))
    ids = torch.randint(0, 250, (2, 16))
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, result.model(input_ids=ids).logits)


@pytest.mark.parametrize("storage", ["bfloat16", "float16", "int32"])
def test_base_dtype_cast_keeps_packed_bytes_in_any_storage(rtn_folder, storage):
    """load_training_base casts the float parameters to --dtype; float-stored packed bytes are
    skipped (a cast would scramble the codes) while embeddings and norms do follow."""
    from safetensors.torch import load_file

    saved = load_file(rtn_folder / "model.safetensors")
    net = load_training_base("rtn", str(rtn_folder), dtype="float32", packed_storage=storage).model
    layers = {n: m for n, m in net.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14
    assert net.model.embed_tokens.weight.dtype == torch.float32
    for name, m in layers.items():
        assert str(m.storage_dtype) == f"torch.{storage}"
        packed = m.packed_tensors()
        assert torch.equal(packed.qweight, saved[f"{name}.qweight"])
        assert torch.equal(packed.g_idx, saved[f"{name}.g_idx"])
        assert torch.equal(
            packed.scales.view(torch.int16), saved[f"{name}.scales"].view(torch.int16)
        )


def test_packed_base_kind_must_match_the_folder(tmp_path, rtn_folder):
    with pytest.raises(UserError, match="quantized with rtn"):
        load_training_base("gptq", str(rtn_folder))
    with pytest.raises(UserError, match=r"^not found: .*nowhere$"):  # a path: no hub call
        load_training_base("rtn", str(tmp_path / "nowhere"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="folder written by `qdiablo quantize`"):
        load_training_base("rtn", str(tmp_path / "plain"))


def test_packed_2bit_layers_hold_at_most_0_6_of_the_4bit_bytes():
    """At SmolLM2's shapes and group size 64, as the benchmark measures on the real model."""
    shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]

    def total(bits: int) -> int:
        return sum(QuantLinear(i, o, bits, 64).packed_bytes() for i, o in shapes)

    assert total(2) <= 0.6 * total(4)
    model = nn.Sequential(*[QuantLinear(i, o, 2, 64) for i, o in shapes])
    assert base_linear_bytes(model)["bytes"] == total(2)
