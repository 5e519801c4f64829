"""The DiaBlo adapter against independent references (issue 2's tests 1–8 and the edges)."""

import json

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn

from qdiablo import DiaBloConfig, DiaBloLinear, DiaBloModel, get_diablo_model
from qdiablo.diablo import model as diablo_model
from qdiablo.errors import UserError

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def dense_block_diagonal(blocks: torch.Tensor, in_features: int, out_features: int):
    """The (in, out) block-diagonal matrix D, filled block by block with explicit loops."""
    n, bi, bo = blocks.shape
    d = torch.zeros(n * bi, n * bo, dtype=blocks.dtype)
    for i in range(n):
        d[i * bi : (i + 1) * bi, i * bo : (i + 1) * bo] = blocks[i]
    return d[:in_features, :out_features]


def randomize_blocks(model: DiaBloModel, scale: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.diablo_layers():
            noise = torch.randn(layer.blocks.shape, generator=g, dtype=torch.float64)
            layer.blocks.copy_((noise * scale).to(layer.blocks.dtype))


def tokens(batch=2, length=12, seed=0):
    return torch.randint(3, 250, (batch, length), generator=torch.Generator().manual_seed(seed))


# 1 ------------------------------------------------------------------------------------------
def test_wrapped_model_starts_exactly_as_the_base():
    base = make_tiny_llama()
    ids = tokens()
    expected = base(ids).logits
    model = get_diablo_model(base, DiaBloConfig(num_blocks=8))
    assert torch.equal(model(ids).logits, expected)
    assert all(torch.count_nonzero(layer.blocks) == 0 for _, layer in model.diablo_layers())


# 2 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("dims", [(64, 32, 8), (48, 96, 4)])
def test_layer_output_equals_dense_block_diagonal_reference(shape, dims):
    fin, fout, n = dims
    torch.manual_seed(0)
    base = nn.Linear(fin, fout, dtype=torch.float64)
    layer = DiaBloLinear(base, n, dropout=0.0, block_dtype=torch.float64)
    with torch.no_grad():
        layer.blocks.normal_()
    x = torch.randn(*shape, fin, dtype=torch.float64)
    expected = x @ base.weight.T + base.bias + x @ dense_block_diagonal(layer.blocks, fin, fout)
    assert torch.allclose(layer(x), expected, atol=1e-12)


def test_low_precision_base_keeps_fp32_blocks_and_its_own_output_dtype():
    base = nn.Linear(32, 32).to(torch.bfloat16)
    layer = DiaBloLinear(base, 4, block_dtype=torch.float32)
    with torch.no_grad():
        layer.blocks.normal_()
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert layer.blocks.dtype == torch.float32 and y.dtype == torch.bfloat16
    reference = base(x).float() + x.float() @ dense_block_diagonal(layer.blocks.detach(), 32, 32)
    assert torch.allclose(y.float(), reference, atol=0.1, rtol=0.02)


def test_block_diagonal_matmul_backward_passes_gradcheck():
    from qdiablo.diablo.layer import block_diagonal_matmul

    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    blocks = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: block_diagonal_matmul(a, b, 6), (x, blocks))
    padded = torch.randn(3, 5, 3, dtype=torch.float64, requires_grad=True)  # 12→8 with 'pad'
    assert torch.autograd.gradcheck(lambda a, b: block_diagonal_matmul(a, b, 8), (x, padded))


def test_dropout_masks_the_adapter_input_only_and_rescales_exactly():
    n, width, p = 4, 64, 0.25
    base = nn.Linear(width, width, bias=False)
    nn.init.zeros_(base.weight)
    layer = DiaBloLinear(base, n, dropout=p)
    with torch.no_grad():
        layer.blocks.copy_(torch.eye(width // n).expand(n, -1, -1))  # D = identity
    layer.train()
    x = torch.ones(200, width)
    y = layer(x)  # = mask ⊙ x / (1 - p)
    values = set(y.unique().tolist())
    assert values == {0.0, torch.tensor(1 / (1 - p), dtype=torch.float32).item()}
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / y.numel()) ** 0.5
    layer.eval()
    assert torch.equal(layer(x), x)


def test_bf16_autocast_trains_fp32_blocks():
    base = nn.Linear(32, 48)
    layer = DiaBloLinear(base, 4, dropout=0.0)
    x = torch.randn(3, 7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().sum().backward()
    assert layer.blocks.grad is not None and layer.blocks.grad.dtype == torch.float32


# 3 ------------------------------------------------------------------------------------------
def test_block_gradients_are_the_diagonal_sub_blocks_of_the_full_finetuning_gradient():
    base = make_tiny_llama(dtype=torch.float64)
    full = make_tiny_llama(dtype=torch.float64)  # same seed: an identical, separate copy
    model = get_diablo_model(base, DiaBloConfig(num_blocks=4, dropout=0.0, block_dtype="float64"))
    randomize_blocks(model)
    # The full fine-tuning copy holds W + Dᵀ, so both models compute the same function.
    with torch.no_grad():
        for name, layer in model.diablo_layers():
            d = dense_block_diagonal(layer.blocks, layer.in_features, layer.out_features)
            full.get_submodule(name).weight += d.T
    ids = tokens(length=16)
    model(input_ids=ids, labels=ids).loss.backward()
    full(input_ids=ids, labels=ids).loss.backward()
    checked = 0
    for name, layer in model.diablo_layers():
        grad_wt = full.get_submodule(name).weight.grad.T  # gradient of Wᵀ, (in, out)
        n, bi, bo = layer.blocks.shape
        for i in range(n):
            sub = grad_wt[i * bi : (i + 1) * bi, i * bo : (i + 1) * bo]
            # float64; attention's backward amplifies last-bit differences to ~1e-9 relative
            assert torch.allclose(layer.blocks.grad[i], sub, rtol=1e-6, atol=1e-9)
            checked += 1
        assert torch.count_nonzero(layer.blocks.grad) > 0
    assert checked == 2 * 5 * 4
    assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith("blocks"))


def test_zero_initialised_blocks_get_gradient_at_the_first_step():
    model = get_diablo_model(make_tiny_llama(), DiaBloConfig(num_blocks=4, dropout=0.0))
    ids = tokens()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(layer.blocks.grad.abs().sum() > 0 for _, layer in model.diablo_layers())


# 4 ------------------------------------------------------------------------------------------
def test_merge_gives_the_adapted_logits_and_unmerge_restores_the_base():
    base = make_tiny_llama()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_diablo_model(base, DiaBloConfig(num_blocks=8, dropout=0.0))
    randomize_blocks(model)
    model.eval()
    ids = tokens()
    adapted = model(ids).logits
    model.merge_adapter()
    assert torch.allclose(model(ids).logits, adapted, atol=1e-5)
    model.unmerge_adapter()
    for name, layer in model.diablo_layers():
        assert torch.allclose(layer.base_layer.weight, original[f"{name}.weight"], atol=1e-6)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, DiaBloLinear) for m in merged.modules())
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert torch.allclose(merged(ids).logits, adapted, atol=1e-5)


# 5 ------------------------------------------------------------------------------------------
def test_save_load_round_trip_is_bit_identical(tmp_path):
    model = get_diablo_model(make_tiny_llama(), DiaBloConfig(num_blocks=8))
    randomize_blocks(model)
    model.eval()
    ids = tokens()
    logits = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["method"] == "diablo" and config["format_version"] == 1
    assert config["num_blocks"] == 8 and config["base_fingerprint"]["sha256"]
    loaded = DiaBloModel.from_pretrained(make_tiny_llama(), tmp_path / "adapter")
    loaded.eval()
    for (name, a), (_, b) in zip(model.diablo_layers(), loaded.diablo_layers()):
        assert torch.equal(a.blocks, b.blocks), name
    assert torch.equal(loaded(ids).logits, logits)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = DiaBloModel.from_pretrained(
        make_tiny_llama(), tmp_path / "adapter", is_trainable=True
    )
    assert trainable.num_trainable_parameters() == model.num_trainable_parameters()


def test_safetensors_keys_are_module_paths(tmp_path):
    from safetensors.torch import load_file

    model = get_diablo_model(make_tiny_llama(), DiaBloConfig(num_blocks=8))
    model.save_pretrained(tmp_path / "adapter")
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    expected = {
        f"model.layers.{i}.{part}.{name}.blocks"
        for i in range(2)
        for part, names in (("self_attn", TARGETS[:3]), ("mlp", TARGETS[3:]))
        for name in names
    }
    assert set(stored) == expected
    assert stored["model.layers.0.self_attn.q_proj.blocks"].shape == (8, 64 // 8, 64 // 8)


def _saved(tmp_path, config=None, seed=0):
    model = get_diablo_model(make_tiny_llama(seed=seed), config or DiaBloConfig(num_blocks=8))
    randomize_blocks(model)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _edit_config(path, **changes):
    file = path / "adapter_config.json"
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


def test_load_onto_another_base_is_refused_unless_forced(tmp_path):
    path = _saved(tmp_path)
    other = make_tiny_llama(seed=1)  # same shapes, other weights (like a 2-bit vs 4-bit base)
    with pytest.raises(UserError, match="different base"):
        DiaBloModel.from_pretrained(other, path)
    assert not any(isinstance(m, DiaBloLinear) for m in other.modules())
    model = DiaBloModel.from_pretrained(other, path, force=True)
    assert len(list(model.diablo_layers())) == 10


def test_a_bf16_copy_of_the_same_base_has_the_same_fingerprint(tmp_path):
    from safetensors.torch import load_file

    path = _saved(tmp_path)
    fp32, bf16 = make_tiny_llama(), make_tiny_llama().to(torch.bfloat16)
    targets = diablo_model.find_targets(fp32, DiaBloConfig())
    assert diablo_model.base_fingerprint(bf16, targets) == diablo_model.base_fingerprint(
        fp32, targets
    )
    model = DiaBloModel.from_pretrained(bf16, path)  # no force: the fingerprint check passes
    saved, loaded = load_file(path / "adapter_model.safetensors"), model.adapter_state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) and loaded[k].dtype == torch.float32 for k in saved)


def test_mismatched_num_blocks_names_the_layer(tmp_path):
    path = _saved(tmp_path)
    _edit_config(path, num_blocks=4)
    with pytest.raises(UserError, match=r"'model\.layers\.0\.self_attn\.q_proj\.blocks' has shape"):
        DiaBloModel.from_pretrained(make_tiny_llama(), path, force=True)


def test_mismatched_targets_name_the_modules(tmp_path):
    path = _saved(tmp_path)
    _edit_config(
        path, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj", "o_proj"]
    )
    with pytest.raises(UserError, match=r"2 tensor\(s\) missing, e\.g\. .*o_proj\.blocks"):
        DiaBloModel.from_pretrained(make_tiny_llama(), path, force=True)
    _edit_config(path, target_modules=["q_proj"])
    with pytest.raises(UserError, match=r"unexpected tensor"):
        DiaBloModel.from_pretrained(make_tiny_llama(), path, force=True)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "adapter_config.json").write_text("{not json"), "malformed JSON"),
        (lambda p: (p / "adapter_config.json").unlink(), "adapter config not found"),
        (lambda p: _edit_config(p, method="lora"), "not 'diablo'"),
        (lambda p: _edit_config(p, format_version=99), r"written by a newer qdiablo .*format 99"),
        (lambda p: _edit_config(p, format_version="x"), "format_version 'x' is not supported"),
        (lambda p: _edit_config(p, num_blockz=3), "unknown DiaBloConfig field"),
        (
            lambda p: (p / "adapter_model.safetensors").write_bytes(
                (p / "adapter_model.safetensors").read_bytes()[:-100]
            ),
            "truncated",
        ),
    ],
)
def test_damaged_adapter_folders_give_clear_errors(tmp_path, damage, message):
    path = _saved(tmp_path)
    damage(path)
    with pytest.raises(UserError, match=message):
        DiaBloModel.from_pretrained(make_tiny_llama(), path)


def test_a_failed_save_leaves_no_folder_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = _saved(tmp_path)
    before = (path / "adapter_model.safetensors").read_bytes()
    model = get_diablo_model(make_tiny_llama(), DiaBloConfig(num_blocks=8))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("qdiablo.diablo.model.save_file", crash)
    with pytest.raises(OSError):
        model.save_pretrained(path)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "new")
    assert (path / "adapter_model.safetensors").read_bytes() == before
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# 6 ------------------------------------------------------------------------------------------
def test_tiny_model_trains_and_the_base_stays_bit_identical():
    base = make_tiny_llama(init_range=0.1)  # the default 0.02 head is too small to fit anything
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_diablo_model(base, DiaBloConfig(num_blocks=4, dropout=0.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens(batch=4, length=6).repeat(1, 4)  # a repeated pattern the blocks can learn
    losses = []
    for _ in range(40):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]
    for name, tensor in base.state_dict().items():
        if not name.endswith(".blocks"):
            key = name.replace(".base_layer", "")
            assert torch.equal(tensor, frozen[key]), name


# 7 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 4, 16])
def test_trainable_parameter_count_is_sum_of_in_out_over_n(n):
    base = make_tiny_llama()
    expected = sum(
        m.in_features * m.out_features // n
        for name, m in base.named_modules()
        if isinstance(m, nn.Linear) and name.split(".")[-1] in TARGETS
    )
    model = get_diablo_model(base, DiaBloConfig(num_blocks=n))
    assert model.num_trainable_parameters() == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


# 8 ------------------------------------------------------------------------------------------
def test_indivisible_n_names_the_layer_and_valid_n():
    with pytest.raises(UserError) as err:
        get_diablo_model(make_tiny_llama(), DiaBloConfig(num_blocks=5))
    message = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in message and "N=5" in message
    assert "valid N nearby: 2, 4, 8, 16" in message


def test_pad_policy_equals_the_dense_reference():
    torch.manual_seed(0)
    base = nn.Linear(50, 30, dtype=torch.float64)
    layer = DiaBloLinear(base, 8, indivisible="pad", block_dtype=torch.float64)
    assert layer.blocks.shape == (8, 7, 4)
    with torch.no_grad():
        layer.blocks.normal_()
    x = torch.randn(2, 3, 50, dtype=torch.float64)
    expected = base(x) + x @ dense_block_diagonal(layer.blocks, 50, 30)
    assert torch.allclose(layer(x), expected, atol=1e-12)
    merged = layer.merged_linear()
    assert torch.allclose(merged(x), expected, atol=1e-12)


# targets ------------------------------------------------------------------------------------
def test_target_selection_forms():
    def wrapped(**kw):
        model = get_diablo_model(make_tiny_llama(layers=3), DiaBloConfig(num_blocks=4, **kw))
        return [n for n, _ in model.diablo_layers()]

    names = wrapped(target_modules="all-linear")
    assert len(names) == 3 * 7 and not any("lm_head" in n for n in names)
    assert wrapped(target_modules=r".*\.(q|v)_proj") == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(3) for p in "qv"
    ]
    assert all(".1." in n for n in wrapped(layers_to_transform=1))
    assert not any("k_proj" in n for n in wrapped(exclude_modules=["k_proj"]))
    with pytest.raises(UserError, match="no layer matches"):
        wrapped(target_modules=["nonexistent"])
    with pytest.raises(UserError, match="not a linear layer"):
        wrapped(target_modules=["mlp"])


def test_gpt2_conv1d_is_refused_with_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    )
    with pytest.raises(UserError, match=r"'transformer\.h\.0\.attn\.c_attn' is a Conv1D"):
        get_diablo_model(gpt2, DiaBloConfig(num_blocks=4, target_modules=["c_attn"]))


def test_config_validation():
    with pytest.raises(UserError, match="num_blocks"):
        DiaBloConfig(num_blocks=0)
    with pytest.raises(UserError, match="indivisible"):
        DiaBloConfig(indivisible="truncate")
    with pytest.raises(UserError, match="dropout"):
        DiaBloConfig(dropout=1.5)
    with pytest.raises(UserError, match="block_dtype"):
        DiaBloConfig(block_dtype="int8")


def test_disable_adapter_runs_the_base_alone():
    base = make_tiny_llama()
    ids = tokens()
    expected = base(ids).logits
    model = get_diablo_model(base, DiaBloConfig(num_blocks=8, dropout=0.0))
    randomize_blocks(model)
    with model.disable_adapter():
        assert torch.equal(model(ids).logits, expected)
    assert not torch.allclose(model(ids).logits, expected)


def test_module_is_importable_by_its_documented_names():
    assert diablo_model.get_diablo_model is get_diablo_model


def test_dropout_keeps_the_shared_input_once_and_matches_the_dense_reference():
    """q, k and v read one hidden state: with dropout their backward holds that tensor once (in
    its own dtype) plus a 1-byte mask each, never a dropped copy in the blocks' float32 nor a
    scaled copy of the blocks; output
    and gradients equal the dense reference, W x + (mask ⊙ x) D / (1 - p), under the same mask."""
    from qdiablo.diablo.layer import dense_delta, dropout_mask

    torch.manual_seed(0)
    p, width = 0.2, 64
    layers = [
        DiaBloLinear(nn.Linear(width, width, bias=False).to(torch.bfloat16), 4, dropout=p)
        for _ in range(3)
    ]
    for layer in layers:
        nn.init.normal_(layer.blocks, std=0.1)
        layer.train()
    x = torch.randn(2, 9, width, dtype=torch.bfloat16, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ys = [layer(x) for layer in layers]
    params = {p.untyped_storage().data_ptr() for layer in layers for p in layer.parameters()}
    activations = sum(n for ptr, n in saved.items() if ptr not in params)
    assert activations == x.numel() * 2 + 3 * x.numel()  # bf16 x once, three bool masks
    assert 3 * 4 * x.numel() > 2 * activations  # three float32 dropped copies took that

    torch.manual_seed(1)
    xr = x.detach().clone().requires_grad_(True)
    refs = []
    for layer in layers:
        keep, scale = dropout_mask(xr, p, True)
        d = dense_delta(layer.blocks, width, width).T  # (in, out)
        h = torch.where(keep, xr.float(), 0.0)
        refs.append(layer.base_layer(xr) + (h @ d * scale).to(torch.bfloat16))
    for y, ref in zip(ys, refs):
        torch.testing.assert_close(y, ref, rtol=0.016, atol=0.02)  # one bf16 step
    sum(y.float().sum() for y in ys).backward()
    grads = [layer.blocks.grad.clone() for layer in layers]
    for layer in layers:
        layer.blocks.grad = None
    sum(r.float().sum() for r in refs).backward()
    for g, layer in zip(grads, layers):
        torch.testing.assert_close(g, layer.blocks.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=0.016, atol=0.02)
