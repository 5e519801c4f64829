"""QuantLinear: a frozen linear layer stored packed in the GPTQ layout, trainable through.
(One file over 400 lines: the layer, its custom matmul op and its storage hooks share invariants.)

Memory really shrinks: the layer holds `qweight`, `qzeros`, `scales`, `g_idx` (and an optional
bias), about bits/8 bytes per weight plus the per-group scales and zeros. Its forward dequantizes
and multiplies; its backward dequantizes *again* to give the input gradient, through a custom
op whose autograd formula saves only the packed tensors, so no full-precision copy of any layer
is kept alive between forward and backward. The base weights never get a gradient.

Storage: the four packed tensors are frozen `nn.Parameter`s holding their bytes in one
`storage_dtype` (int32 by default; a float dtype such as bf16 as bitsandbytes' `quant_storage`),
so that FSDP2 shards them like any other parameter. Every reader goes through
`QuantLinear.packed_tensors()`, which views the bytes back as int32 codes and fp16 scales. No
cast touches the bytes: torch's dtype casts skip integer tensors, `_apply` moves float-stored
bytes as raw bytes, and the state dict (hence the GPTQ checkpoint and the adapters' base
fingerprint) always holds the GPTQ dtypes.

`quantizers.packing.dequantize_packed` is the one place that turns the packed tensors into a
float weight (the torch path). On CUDA the fused Triton kernels of `quantizers.kernels` can
replace it in forward and backward, dequantizing tiles in registers; `quantizers.kernels.select`
decides, and logs which.
The matmul is the custom op `torch.ops.qdiablo.packed_matmul` (torch.compile traces through it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn

from quantizers import kernels
from quantizers.packing import (
    dequantize_packed,
    pack_qweight,
    pack_qzeros,
    packable,
    unpack_qweight,
    unpack_qzeros,
)
from quantizers.rtn import MIN_SCALE, QuantResult

PACKED_NAMES = ("qweight", "qzeros", "scales", "g_idx")
PACKED_DTYPES = {
    "qweight": torch.int32,
    "qzeros": torch.int32,
    "scales": torch.float16,
    "g_idx": torch.int32,
}
STORAGE_DTYPES = (
    torch.int32,
    torch.int16,
    torch.uint8,
    torch.int8,
    torch.bfloat16,
    torch.float16,
    torch.float32,
)


class PackedTensors(NamedTuple):
    """The packed tensors in their GPTQ dtypes (views of the layer's storage, no copies)."""

    qweight: Tensor  # int32 [in·bits/32, out]
    qzeros: Tensor  # int32 [groups, out·bits/32]
    scales: Tensor  # fp16 [groups, out]
    g_idx: Tensor  # int32 [in]


def as_packed_dtype(name: str, stored: Tensor) -> Tensor:
    """`stored` (a packed tensor in any storage dtype) viewed as its GPTQ dtype."""
    dtype = PACKED_DTYPES[name]
    return stored if stored.dtype == dtype else stored.view(dtype)


def _flat(t: Tensor) -> Tensor:
    """t as a 2-D [rows, features] matrix (a view when possible), for the Triton kernels."""
    return t.reshape(-1, t.shape[-1])


# The packed matmul is one custom op, `torch.ops.qdiablo.packed_matmul`, with its input gradient
# `qdiablo::packed_matmul_dx`, a fake (shape-only) implementation of each and an autograd
# formula: torch.compile traces QuantLinear through them without looking inside, and at run
# time they dispatch to a kernel backend (Triton) or the torch path as `quantizers.kernels` says.


@torch.library.custom_op("qdiablo::packed_matmul", mutates_args=())
def packed_matmul(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor,
    bits: int,
    bias: Tensor | None = None,
    group: int | None = None,
) -> Tensor:
    """y = x · W (+ bias), W = dequantize_packed(...) [in, out]; x [..., in] -> y [..., out].
    `group` (the group size when g_idx has no act-order, else None) only speeds things up."""
    backend = kernels.select(x, bits)
    if backend != kernels.TORCH:
        y = kernels.backend_forward(
            backend, _flat(x), qweight, qzeros, scales, g_idx, bits, bias, group
        )
        if y is not None:  # None: the self-check sent this kernel variant to the torch path
            return y.view(*x.shape[:-1], y.shape[-1])
    y = x @ dequantize_packed(qweight, qzeros, scales, g_idx, bits, x.dtype, group)
    return y if bias is None else y + bias.to(y.dtype)


@packed_matmul.register_fake
def _(x, qweight, qzeros, scales, g_idx, bits, bias=None, group=None):
    return x.new_empty(*x.shape[:-1], scales.shape[1])


@torch.library.custom_op("qdiablo::packed_matmul_dx", mutates_args=())
def packed_matmul_dx(
    grad_out: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor,
    bits: int,
    group: int | None = None,
) -> Tensor:
    """dx = dy · Wᵀ, W dequantized again (nothing of it was saved by the forward)."""
    backend = kernels.select(grad_out, bits)
    if backend != kernels.TORCH:
        dy = _flat(grad_out)
        dx = kernels.backend_backward_input(
            backend, dy, qweight, qzeros, scales, g_idx, bits, group
        )
        if dx is not None:
            return dx.view(*grad_out.shape[:-1], dx.shape[-1])
    w = dequantize_packed(qweight, qzeros, scales, g_idx, bits, grad_out.dtype, group)
    return grad_out @ w.t()


@packed_matmul_dx.register_fake
def _(grad_out, qweight, qzeros, scales, g_idx, bits, group=None):
    return grad_out.new_empty(*grad_out.shape[:-1], g_idx.shape[0])


def _setup_packed_matmul(ctx, inputs, output):
    _, qweight, qzeros, scales, g_idx, bits, bias, group = inputs
    ctx.save_for_backward(qweight, qzeros, scales, g_idx)  # packed only: no float weight
    ctx.bits, ctx.group = bits, group
    ctx.bias_grad = bias is not None and bias.requires_grad


def _packed_matmul_backward(ctx, grad_out):
    qweight, qzeros, scales, g_idx = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = packed_matmul_dx(grad_out, qweight, qzeros, scales, g_idx, ctx.bits, ctx.group)
    if ctx.bias_grad:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return grad_x, None, None, None, None, None, grad_bias, None


packed_matmul.register_autograd(_packed_matmul_backward, setup_context=_setup_packed_matmul)


def effective_scales(scales0: Tensor, multiplier: Tensor) -> Tensor:
    """fp16(clamp(s₀·m, MIN_SCALE)): the scales a layer with multiplier m computes with."""
    return (scales0.float() * multiplier.detach().float()).clamp(min=MIN_SCALE).half()


# A trained scale multiplier m (quantizers.trained_scales) computes with fp16(clamp(s₀·m)); its
# gradient passes the rounding and the clamp straight through.


class _ScaledPackedMatmul(torch.autograd.Function):
    """y = x · W(s) (+ bias) with s = effective_scales(s₀, m); gradients for x, m and bias."""

    @staticmethod
    def forward(ctx, x, multiplier, qweight, qzeros, scales0, g_idx, bits, bias, group):
        scales = effective_scales(scales0, multiplier)
        ctx.save_for_backward(x, qweight, qzeros, scales, scales0, g_idx)
        ctx.bits, ctx.group, ctx.has_bias = bits, group, bias is not None
        b = None if bias is None else bias.to(x.dtype)
        return packed_matmul(x, qweight, qzeros, scales, g_idx, bits, b, group)

    @staticmethod
    def backward(ctx, dy):
        x, qweight, qzeros, scales, scales0, g_idx = ctx.saved_tensors
        dx = dm = dbias = None
        if ctx.needs_input_grad[0]:
            dx = packed_matmul_dx(dy, qweight, qzeros, scales, g_idx, ctx.bits, ctx.group)
        if ctx.needs_input_grad[1]:
            xf = x.reshape(-1, x.shape[-1]).float()
            dyf = dy.reshape(-1, dy.shape[-1]).float()
            grad_w = xf.t() @ dyf  # [in, out]: ∂L/∂W in the packed [in, out] orientation
            ones = torch.ones_like(scales)
            codes = dequantize_packed(qweight, qzeros, ones, g_idx, ctx.bits, group=ctx.group)
            per_row = grad_w * codes  # (q − z) · ∂L/∂W
            ds = torch.zeros_like(scales, dtype=torch.float32).index_add_(0, g_idx.long(), per_row)
            dm = ds * scales0.float()
        if ctx.has_bias and ctx.needs_input_grad[7]:
            dbias = dy.reshape(-1, dy.shape[-1]).sum(0)
        return dx, dm, None, None, None, None, None, dbias, None


def quant_matmul(x: Tensor, qweight, qzeros, scales, g_idx, bits: int, bias=None, group=None):
    """QuantLinear's matmul: the custom op, with x in the dtype CUDA autocast would compute a
    matmul in (a custom op is not autocast-aware by itself)."""
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        x = x.to(torch.get_autocast_dtype("cuda"))
    bias = None if bias is None else bias.to(x.dtype)
    return packed_matmul(x, qweight, qzeros, scales, g_idx, bits, bias, group)


class QuantLinear(nn.Module):
    """A packed, frozen linear layer: forward(x) = x·dequant(W)ᵀ (+ bias).

    Packed tensors (the GPTQ layout, zero points in the gptq_v2 convention), read them with
    `packed_tensors()`:
        qweight int32 [in·bits/32, out], qzeros int32 [groups, out·bits/32],
        scales fp16 [groups, out], g_idx int32 [in].
    They are frozen parameters whose bytes are stored as `storage_dtype` (see the module
    docstring); `bias` [out] (optional) is an ordinary buffer that follows the model's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int = -1,
        bias: bool = False,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        storage_dtype: torch.dtype = torch.int32,
    ):
        super().__init__()
        _check_storage_dtype(storage_dtype)
        for n, what in ((in_features, "in_features"), (out_features, "out_features")):
            if not packable(n, bits):
                raise ValueError(
                    f"{what}={n} cannot be packed at {bits} bits: it must be a multiple of "
                    f"{32 // _gcd(bits, 32)}"
                )
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        groups = 1 if group_size == -1 else -(-in_features // group_size)
        self.storage_dtype = storage_dtype
        kw = {"device": device}
        default_g_idx = torch.arange(in_features, **kw) // (
            in_features if group_size == -1 else group_size
        )
        packed = {
            "qweight": torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32, **kw),
            "qzeros": torch.zeros(groups, out_features * bits // 32, dtype=torch.int32, **kw),
            "scales": torch.zeros(groups, out_features, dtype=torch.float16, **kw),
            "g_idx": default_g_idx.to(torch.int32),
        }
        for name, tensor in packed.items():
            self.register_parameter(name, _frozen(tensor.view(storage_dtype)))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, **kw))
        else:
            self.bias = None
        # Optional trainable per-group scale multipliers (quantizers.trained_scales): never part
        # of the state dict, which always holds the stored GPTQ tensors.
        self.register_parameter("scale_multiplier", None)
        self._cache: Tensor | None = None
        self._caching = False
        # g_idx as built is plain `row // group`: its group size is known without reading it
        stored = self._parameters["g_idx"]
        known = in_features if group_size == -1 else min(group_size, in_features)
        self._group: tuple[Tensor, int, int | None] | None = (stored, stored._version, known)
        self._loaded_group: int | bool | None = False  # set by the load pre-hook, False: none
        self.register_state_dict_post_hook(_state_dict_in_packed_dtypes)
        self.register_load_state_dict_pre_hook(_load_into_storage_dtype)
        self.register_load_state_dict_post_hook(_remember_loaded_group)

    @classmethod
    def from_result(
        cls,
        result: QuantResult,
        group_size: int,
        bias: Tensor | None = None,
        storage_dtype: torch.dtype = torch.int32,
    ) -> QuantLinear:
        """Pack a quantization result (codes [out, in], scales/zeros [groups, out])."""
        out_features, in_features = result.codes.shape
        layer = cls(
            in_features,
            out_features,
            result.bits,
            group_size,
            bias=bias is not None,
            bias_dtype=bias.dtype if bias is not None else torch.float32,
            device=result.codes.device,
            storage_dtype=storage_dtype,
        )
        packed = layer.packed_tensors()
        packed.qweight.copy_(pack_qweight(result.codes, result.bits))
        packed.qzeros.copy_(pack_qzeros(result.zeros, result.bits))
        packed.scales.copy_(result.scales.half())
        packed.g_idx.copy_(result.g_idx)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        layer._keep_group(kernels.group_size_of(result.g_idx))  # at quantize time, not per step
        return layer

    def packed_tensors(self) -> PackedTensors:
        """qweight, qzeros, g_idx as int32 and scales as fp16, whatever the storage dtype: views
        of the stored bytes (writing into them writes the layer). Every reader goes through here."""
        return PackedTensors(*(as_packed_dtype(n, self._parameters[n]) for n in PACKED_NAMES))

    def set_storage_dtype(self, dtype: torch.dtype) -> QuantLinear:
        """Hold the packed bytes as `dtype` from now on (the bytes themselves do not change)."""
        _check_storage_dtype(dtype)
        group = self._known_group()
        for name, view in zip(PACKED_NAMES, self.packed_tensors()):
            self._parameters[name] = _frozen(view.view(dtype))
        self.storage_dtype = dtype
        self._keep_group(group)
        return self

    def effective_packed(self) -> PackedTensors:
        """The packed tensors the layer computes with: the stored ones, with the scales times
        the trained multiplier when it has one (quantizers.trained_scales)."""
        packed = self.packed_tensors()
        if self.scale_multiplier is None:
            return packed
        return packed._replace(scales=effective_scales(packed.scales, self.scale_multiplier))

    def _known_group(self) -> int | bool | None:
        """The cached group size if it is still valid for the stored g_idx, else False."""
        stored, cached = self._parameters["g_idx"], self._group
        if cached is not None and cached[0] is stored and cached[1] == stored._version:
            return cached[2]
        return False

    def _keep_group(self, group: int | bool | None) -> None:
        """Carry a known group size over to a g_idx holding the same values (moved, re-viewed)."""
        stored = self._parameters["g_idx"]
        self._group = None if group is False else (stored, stored._version, group)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dequantized weight [out, in] (a transposed view of the [in, out] result)."""
        w = dequantize_packed(
            *self.effective_packed(),
            self.bits,
            dtype or torch.float32,
            self.contiguous_group_size(),
        )
        return w.t()

    def codes(self) -> Tensor:
        """The integer codes [out, in] (for tests and inspection)."""
        return unpack_qweight(self.packed_tensors().qweight, self.bits, self.in_features).t()

    def zeros(self) -> Tensor:
        """The zero points [groups, out] (gptq_v2 convention: as is)."""
        return unpack_qzeros(self.packed_tensors().qzeros, self.bits, self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        if self.scale_multiplier is not None and not self._caching:
            packed = self.packed_tensors()
            if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):  # as quant_matmul
                x = x.to(torch.get_autocast_dtype("cuda"))
            return _ScaledPackedMatmul.apply(
                x, self.scale_multiplier, *packed, self.bits, self.bias,
                self.contiguous_group_size(),
            )  # fmt: skip
        packed = self.effective_packed()
        if self._caching:
            cache = self._cache
            if cache is None or cache.dtype != x.dtype or cache.device != x.device:
                self._cache = dequantize_packed(
                    *packed, self.bits, x.dtype, self.contiguous_group_size()
                )
            y = x @ self._cache
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return quant_matmul(x, *packed, self.bits, self.bias, self.contiguous_group_size())

    def contiguous_group_size(self) -> int | None:
        """The group size if g_idx has no act-order (else None), for the fast paths of the
        Triton kernels and of `dequantize_packed`. Cached while g_idx is the same tensor at the
        same version, and known without reading g_idx where it can be: as built, as loaded (read
        from the incoming, usually host, tensor), across device moves and storage re-views. So
        the check (a device sync on GPU) never runs in a training step unless g_idx was edited
        in place. torch.compile bakes the eager value into its graph."""
        stored = self._parameters["g_idx"]
        cached = self._group
        if torch.compiler.is_compiling():  # a traced graph cannot check g_idx's values
            return cached[2] if cached is not None else None  # None: the gather path, exact
        if cached is None or cached[0] is not stored or cached[1] != stored._version:
            g_idx = as_packed_dtype("g_idx", stored)
            cached = (stored, stored._version, kernels.group_size_of(g_idx))
            self._group = cached
        return cached[2]

    def _apply(self, fn, recurse=True):
        # model.to(dtype), .half(), .float(), ... must never touch the packed bytes: apply `fn`
        # to their raw uint8 view (which dtype casts skip) and keep only its device move. The
        # bias follows the model's dtype like any buffer.
        # (parameters sharded by FSDP, DTensors, take the ordinary path: FSDP manages them)
        group = self._known_group()
        packed = {
            n: self._parameters.pop(n) for n in PACKED_NAMES if not _is_dtensor(self._parameters[n])
        }
        try:
            super()._apply(fn, recurse)
        finally:
            for name, stored in packed.items():
                self._parameters[name] = _move_bytes(stored, fn)
        self._keep_group(group)  # a move keeps g_idx's values
        m = self.scale_multiplier
        if m is not None and m.dtype != torch.float32:  # multipliers train in float32
            m.data = m.data.float()
        return self

    def packed_bytes(self) -> int:
        """Bytes held by the packed tensors and the bias (counted on their GPTQ dtypes)."""
        tensors = [*self.packed_tensors(), *([] if self.bias is None else [self.bias])]
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        groups = self.packed_tensors().scales.shape[0]
        storage = str(self.storage_dtype).removeprefix("torch.")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, groups={groups}, "
            f"bias={self.bias is not None}, storage={storage}"
        )


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _check_storage_dtype(dtype: torch.dtype) -> None:
    if dtype not in STORAGE_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in STORAGE_DTYPES)
        raise ValueError(f"storage_dtype {dtype}: expected one of {names}")


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor" or type(t.data).__name__ == "DTensor"


def _move_bytes(stored: nn.Parameter, fn) -> nn.Parameter:
    """`fn` (a Module._apply function) applied to a packed parameter's bytes: a device move
    (or to_empty) happens, a dtype cast never does."""
    raw = stored.data.view(torch.uint8)
    moved = fn(raw)
    if moved is raw:
        return stored
    if moved.dtype != torch.uint8:  # e.g. Module.type(dtype), which casts even integers
        moved = raw.to(moved.device)
    return _frozen(moved.view(stored.dtype))


def _state_dict_in_packed_dtypes(module, state_dict, prefix, local_metadata) -> None:
    """The state dict holds the GPTQ dtypes (int32 qweight, fp16 scales, ...), whatever the
    storage dtype, and never a trained scale multiplier: saved checkpoints and adapter
    fingerprints do not depend on either."""
    state_dict.pop(prefix + "scale_multiplier", None)
    for name in PACKED_NAMES:
        key = prefix + name
        t = state_dict.get(key)
        if t is not None and not _is_dtensor(t) and t.dtype != PACKED_DTYPES[name]:
            state_dict[key] = as_packed_dtype(name, t)


def _load_into_storage_dtype(module, state_dict, prefix, *args) -> None:
    """Tensors given in their GPTQ dtypes are viewed as the storage dtype before loading, so
    `load_state_dict` copies (or assigns) bytes and never casts values."""
    g_idx = state_dict.get(prefix + "g_idx")
    readable = (torch.int32, module.storage_dtype)
    if (
        g_idx is not None
        and not _is_dtensor(g_idx)
        and not g_idx.is_meta
        and g_idx.dtype in readable
    ):
        # read here, from the incoming tensor (a host tensor when loading from a file)
        module._loaded_group = kernels.group_size_of(as_packed_dtype("g_idx", g_idx))
    for name in PACKED_NAMES:
        key = prefix + name
        t = state_dict.get(key)
        stored = module._parameters.get(name)
        if t is None or stored is None or _is_dtensor(t) or t.dtype == stored.dtype:
            continue
        if t.dtype != PACKED_DTYPES[name]:
            raise ValueError(
                f"{key}: got {str(t.dtype).removeprefix('torch.')}, expected "
                f"{str(PACKED_DTYPES[name]).removeprefix('torch.')} (the GPTQ layout)"
            )
        state_dict[key] = t.contiguous().view(stored.dtype)


def _remember_loaded_group(module, incompatible_keys) -> None:
    """After a load: the group size the pre-hook read from the incoming g_idx, for the new one."""
    if module._loaded_group is not False:
        module._keep_group(module._loaded_group)
        module._loaded_group = False


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


@contextlib.contextmanager
def dequantize_cache(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this block every QuantLinear of `model` dequantizes its weight once (on first use,
    in the input's dtype) and reuses it: fast repeated forwards, e.g. CPU generation in
    evaluation. The float copies are freed on exit. Not for training: the cached weight is a
    plain tensor that autograd would keep for backward."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    previous = [m._caching for m in layers]
    for m in layers:
        m._caching = True
    try:
        yield model
    finally:
        for m, was in zip(layers, previous):
            m._caching = was
            if not was:
                m._cache = None
