"""torch.compile over a packed base with DiaBlo adapters: QuantLinear's matmul is the custom op
`qdiablo::packed_matmul` (fake implementation + autograd formula), so Dynamo traces the model
without breaking at it, and compiled and eager runs agree on loss and gradients (torch path,
CPU; Inductor needs a C compiler, which CI has)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama

from qdiablo import DiaBloConfig, get_diablo_model
from quantizers import QuantConfig, QuantLinear, quantize_model
from quantizers.quant_linear import packed_matmul


def packed_diablo(bits: int, seed: int = 0):
    model = make_tiny_llama(seed=seed, layers=1)
    model = quantize_model(model, None, QuantConfig(method="rtn", bits=bits, group_size=32))
    model = get_diablo_model(model, DiaBloConfig(num_blocks=4, dropout=0.0))
    torch.manual_seed(seed)
    for _, layer in model.diablo_layers():
        layer.blocks.data.normal_(0, 0.05)
    return model


def loss_and_grads(model, ids, params):
    params.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in params.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_packed_matmul_op_passes_torch_library_checks():
    """The op's fake implementation, autograd registration and schema agree with its eager
    behaviour (torch.library.opcheck), with and without bias, at 3 and 4 bits."""
    for bits, bias in ((3, True),):
        layer = QuantLinear(64, 32, bits, 32, bias=bias)
        torch.manual_seed(bits)
        packed = layer.packed_tensors()  # views of the layer's storage: writing them writes it
        packed.qweight.random_(-(2**31), 2**31 - 1)
        packed.scales.uniform_(0.01, 0.02)
        if bias:
            layer.bias.normal_()
        x = torch.randn(3, 5, 64, requires_grad=True)
        b = layer.bias.requires_grad_(True) if bias else None
        args = (x, *packed, bits, b, 32)
        torch.library.opcheck(packed_matmul, args)


@pytest.mark.slow  # ~1-2 min of tracing on 2 cores
def test_compiled_model_equals_eager_loss_and_gradients():
    """torch.compile(model) of the whole causal LM (AOTAutograd: the op's fake implementation
    and autograd formula; Inductor itself is exercised on one layer below, to stay fast)."""
    torch._dynamo.reset()
    eager = packed_diablo(bits=4)
    twin = copy.deepcopy(eager)
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(1))
    loss_e, grads_e = loss_and_grads(eager, ids, eager)
    compiled = torch.compile(twin, backend="aot_eager")
    loss_c, grads_c = loss_and_grads(compiled, ids, twin)
    torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
    assert grads_e.keys() == grads_c.keys() and len(grads_e) == 5  # q, k, v, up, down
    for name, g in grads_e.items():
        assert g.abs().sum() > 0
        torch.testing.assert_close(grads_c[name], g, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "bits, backend", [(2, "aot_eager"), pytest.param(3, "inductor", marks=pytest.mark.slow)]
)
def test_packed_layer_compiles_in_one_graph(bits, backend):
    """fullgraph=True: no graph break at the packed matmul; forward and backward compiled
    around it (Inductor: ~1-2 min of C++ builds on 2 cores, so `slow`) match eager."""
    torch._dynamo.reset()
    model = packed_diablo(bits=bits)
    _, layer = next(iter(model.diablo_layers()))
    x = torch.randn(2, 7, layer.in_features, requires_grad=True)
    y_eager = layer(x)
    (gx_eager,) = torch.autograd.grad(y_eager.square().sum(), x)
    fn = torch.compile(layer, fullgraph=True, backend=backend)
    y = fn(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(gx, gx_eager)
