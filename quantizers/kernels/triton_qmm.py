"""Triton kernels for the packed GPTQ layout: dequantize in registers, multiply, never write W.

    W[k, n] = scales[g, n] · (q[k, n] − z[g, n]),   g = g_idx[k]          (W is [in, out])
    forward         Y  = X · W      (+ bias)     X [M, K], Y [M, N]
    input gradient  dX = dY · Wᵀ                 dY [M, N], dX [M, K]
    decode (M ≤ 8)  Y  = X · W  as a split-K GEMV that reads every packed word once

Code q[k, n] is the `bits`-bit field at bit k·bits of column n's stream (see packing.py): word
(k·bits) >> 5 of qweight's column n, shifted right by (k·bits) & 31. At 3 bits a field can
straddle two words (values 10 and 21 of each 32); its high bits then come from the next word.
Zero points are packed the same way along the output dimension of qzeros.

This module imports triton at the top: import it only through `quantizers.kernels`, which checks
that triton is there. Under TRITON_INTERPRET=1 (set before this module is first imported) the
kernels run on CPU tensors through Triton's interpreter, which is how CI tests them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

INTERPRETED = isinstance(tl.zeros, InterpretedFunction)
"""Whether triton (and so the kernels below) runs in its CPU interpreter: decided when triton was
first imported, by TRITON_INTERPRET then."""

GEMV_MAX_M = 8
"""Up to this many rows, the forward uses the bandwidth-bound split-K GEMV."""


@triton.jit
def _field(ptrs, shift, next_word, mask, BITS: tl.constexpr):
    """The BITS-bit field starting `shift` bits into the word at `ptrs`; its high bits spill into
    the word at `ptrs + next_word` when shift + BITS > 32 (3-bit only). uint32 throughout, so
    right shifts are logical."""
    lo = tl.load(ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    sh = shift.to(tl.uint32)
    v = lo >> sh
    if 32 % BITS != 0:
        spill = mask & (shift > 32 - BITS)
        hi = tl.load(ptrs + next_word, mask=spill, other=0).to(tl.uint32, bitcast=True)
        up = tl.where(spill, 32 - shift, 0).to(tl.uint32)  # no 32-bit shift on other lanes
        v = v | tl.where(spill, hi << up, 0).to(tl.uint32)
    return (v & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _dequant_tile(
    qw_ptr,
    qz_ptr,
    sc_ptr,
    gi_ptr,
    k0,
    offs_k,
    offs_n,
    K,
    N,
    group,
    stride_qw,
    stride_qz,
    stride_sc,
    BITS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """W[offs_k, offs_n] as float32, [BLOCK_K, BLOCK_N]; zero outside [K, N].

    ALIGNED: g_idx is arange(K) // group and the tile lies in one group, so scales and zeros are
    one row (g = k0 // group) read once, instead of one gathered row per k (act-order).
    For 2/4/8 bits the tile's packed words, [BLOCK_K·BITS/32, BLOCK_N], are read once and
    expanded with shifts; at 3 bits each field is read (and re-assembled) where it lies.
    """
    mask_k = offs_k < K
    mask_n = offs_n < N
    mask = mask_k[:, None] & mask_n[None, :]
    if 32 % BITS == 0:
        PER: tl.constexpr = 32 // BITS
        WORDS: tl.constexpr = BLOCK_K // PER
        offs_w = k0 // PER + tl.arange(0, WORDS)
        wmask = (offs_w < K // PER)[:, None] & mask_n[None, :]
        words = tl.load(qw_ptr + offs_w[:, None] * stride_qw + offs_n[None, :], mask=wmask, other=0)
        words = words.to(tl.uint32, bitcast=True)
        shifts = (tl.arange(0, PER) * BITS).to(tl.uint32)
        q = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        q = tl.reshape(q, (BLOCK_K, BLOCK_N)).to(tl.int32)
    else:
        kbit = offs_k * BITS
        q = _field(
            qw_ptr + (kbit >> 5)[:, None] * stride_qw + offs_n[None, :],
            (kbit & 31)[:, None],
            stride_qw,
            mask,
            BITS,
        )
    nbit = offs_n * BITS
    if ALIGNED:
        g = k0 // group
        z = _field(qz_ptr + g * stride_qz + (nbit >> 5), nbit & 31, 1, mask_n, BITS)
        s = tl.load(sc_ptr + g * stride_sc + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        w = (q - z[None, :]).to(tl.float32) * s[None, :]
    else:
        g = tl.load(gi_ptr + offs_k, mask=mask_k, other=0)
        z = _field(
            qz_ptr + g[:, None] * stride_qz + (nbit >> 5)[None, :],
            (nbit & 31)[None, :],
            1,
            mask,
            BITS,
        )
        s = tl.load(sc_ptr + g[:, None] * stride_sc + offs_n[None, :], mask=mask, other=0.0)
        w = (q - z).to(tl.float32) * s.to(tl.float32)
    return tl.where(mask, w, 0.0)


@triton.jit
def _qmm_fwd_kernel(
    x_ptr,
    qw_ptr,
    qz_ptr,
    sc_ptr,
    gi_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    group,
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yn,
    stride_qw,
    stride_qz,
    stride_sc,
    BITS: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Y[BLOCK_M, BLOCK_N] tile = Σ_k X[:, k-tile] · W[k-tile, :], W dequantized in registers."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # grouped launch order: GROUP_M row tiles share each column tile of W while it is in L2
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=(offs_m < M)[:, None] & (offs_k < K)[None, :],
            other=0.0,
        )
        w = _dequant_tile(
            qw_ptr, qz_ptr, sc_ptr, gi_ptr, k0, offs_k, offs_n, K, N, group,
            stride_qw, stride_qz, stride_sc, BITS, BLOCK_K, BLOCK_N, ALIGNED,
        )  # fmt: skip
        if IEEE:
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=(offs_m < M)[:, None] & (offs_n < N)[None, :],
    )


@triton.jit
def _qmm_dx_kernel(
    dy_ptr,
    qw_ptr,
    qz_ptr,
    sc_ptr,
    gi_ptr,
    dx_ptr,
    M,
    N,
    K,
    group,
    stride_dym,
    stride_dyn,
    stride_dxm,
    stride_dxk,
    stride_qw,
    stride_qz,
    stride_sc,
    BITS: tl.constexpr,
    ALIGNED: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dX[BLOCK_M, BLOCK_K] tile = Σ_n dY[:, n-tile] · W[k-tile, n-tile]ᵀ: the same dequantized
    tile as forward, contracted over the output dimension instead."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_k = tl.cdiv(K, BLOCK_K)
    width = GROUP_M * grid_k
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_k = (pid % width) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
            mask=(offs_m < M)[:, None] & (offs_n < N)[None, :],
            other=0.0,
        )
        w = _dequant_tile(
            qw_ptr, qz_ptr, sc_ptr, gi_ptr, k0, offs_k, offs_n, K, N, group,
            stride_qw, stride_qz, stride_sc, BITS, BLOCK_K, BLOCK_N, ALIGNED,
        )  # fmt: skip
        wt = tl.trans(w.to(dy.dtype))
        if IEEE:  # noqa: SIM108 (a constexpr branch: compiled once, not a runtime choice)
            acc = tl.dot(dy, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(dy, wt, acc)
    tl.store(
        dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
        acc.to(dx_ptr.dtype.element_ty),
        mask=(offs_m < M)[:, None] & (offs_k < K)[None, :],
    )


@triton.jit
def _qmv_kernel(
    x_ptr,
    qw_ptr,
    qz_ptr,
    sc_ptr,
    gi_ptr,
    part_ptr,
    M,
    N,
    K,
    group,
    k_per_split,
    stride_xm,
    stride_xk,
    stride_qw,
    stride_qz,
    stride_sc,
    BITS: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Decode: partial[split, m, n] = Σ_{k in this split} X[m, k]·W[k, n], for M ≤ BLOCK_M ≤ 8.

    One program per (column tile, K split): it streams its packed words once, with no tensor
    core (M is too small to use one), reducing with a multiply and a sum over k in fp32. The
    splits fill the GPU when N alone gives too few programs; their sum is taken outside.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, k_per_split, BLOCK_K):
        k0 = pid_s * k_per_split + kk
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=(offs_m < M)[:, None] & (offs_k < K)[None, :],
            other=0.0,
        ).to(tl.float32)
        w = _dequant_tile(
            qw_ptr, qz_ptr, sc_ptr, gi_ptr, k0, offs_k, offs_n, K, N, group,
            stride_qw, stride_qz, stride_sc, BITS, BLOCK_K, BLOCK_N, ALIGNED,
        )  # fmt: skip
        acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
    tl.store(
        part_ptr + pid_s * M * N + offs_m[:, None] * N + offs_n[None, :],
        acc,
        mask=(offs_m < M)[:, None] & (offs_n < N)[None, :],
    )


# ---------------------------------------------------------------------------------------------
# launchers


def _gemm_blocks(m: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps). Small tiles for the interpreter (numpy per
    program) and for short M; a conventional 128×128×32 tile for training-size M on GPU.
    Untuned: the GPU benchmark (benchmarks/gpu_suite.py) is where these get chosen."""
    if INTERPRETED:  # 64-wide tiles leave ragged edges at the tests' K, N (multiples of 32)
        return 16, 64, 64, 4
    if m <= 64:
        return 16, 128, 64, 4
    if dtype == torch.float32:
        return 64, 64, 32, 4
    return 128, 128, 32, 8


def _aligned(group: int | None, block_k: int, k: int) -> tuple[bool, int]:
    """Whether tiles of BLOCK_K rows never straddle a group (so one scale row per tile)."""
    if group is None:
        return False, k
    return (group >= k or group % block_k == 0), max(group, 1)


def _check(x: Tensor, qweight: Tensor, bits: int, k: int) -> None:
    """The kernels index the packed buffers assuming contiguous rows."""
    for t in (qweight,):
        if not t.is_contiguous():
            raise ValueError("packed buffers must be contiguous")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits={bits}: the Triton kernels support 2, 3, 4 and 8")
    if qweight.shape[0] * 32 != k * bits:
        raise ValueError(f"qweight rows {qweight.shape[0]} do not hold K={k} values of {bits} bits")


def forward(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor,
    bits: int,
    bias: Tensor | None = None,
    group: int | None = None,
) -> Tensor:
    """Y = X · dequant(W) (+ bias) for X [M, K] -> Y [M, N] in X's dtype.

    `group`: the group size when g_idx is arange(K) // group (no act-order), else None; it only
    selects the faster one-scale-row-per-tile path, the result is the same.
    """
    m, k = x.shape
    n = scales.shape[1]
    _check(x, qweight, bits, k)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m <= GEMV_MAX_M:
        return _gemv(x, qweight, qzeros, scales, g_idx, bits, bias, group, out=y)
    bm, bn, bk, warps = _gemm_blocks(m, x.dtype)
    aligned, grp = _aligned(group, bk, k)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _qmm_fwd_kernel[grid](
        x, qweight, qzeros, scales, g_idx, bias if bias is not None else y, y,
        m, n, k, grp,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        qweight.stride(0), qzeros.stride(0), scales.stride(0),
        BITS=bits, ALIGNED=aligned, HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps,
    )  # fmt: skip
    return y


def backward_input(
    dy: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor,
    bits: int,
    group: int | None = None,
) -> Tensor:
    """dX = dY · dequant(W)ᵀ for dY [M, N] -> dX [M, K] in dY's dtype."""
    m, n = dy.shape
    k = g_idx.shape[0]
    _check(dy, qweight, bits, k)
    dx = torch.empty(m, k, dtype=dy.dtype, device=dy.device)
    bm, bn, bk, warps = _gemm_blocks(m, dy.dtype)
    bn, bk = bk, bn  # here K is the output tile and N the reduction
    bk = max(bk, 32)  # whole packed words per tile at every bit width (PER ≤ 16)
    aligned, grp = _aligned(group, bk, k)
    grid = (triton.cdiv(m, bm) * triton.cdiv(k, bk),)
    _qmm_dx_kernel[grid](
        dy, qweight, qzeros, scales, g_idx, dx,
        m, n, k, grp,
        dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
        qweight.stride(0), qzeros.stride(0), scales.stride(0),
        BITS=bits, ALIGNED=aligned, IEEE=dy.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps,
    )  # fmt: skip
    return dx


def _gemv(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor,
    bits: int,
    bias: Tensor | None,
    group: int | None,
    out: Tensor,
) -> Tensor:
    m, k = x.shape
    n = scales.shape[1]
    bm = triton.next_power_of_2(m)
    # the [BLOCK_M, BLOCK_K, BLOCK_N] product lives in registers: keep it ≤ 64 floats a thread
    bn, bk, warps = (64, 64, 4) if bm <= 2 else (64, 32, 8)
    if INTERPRETED:
        bn, bk, target = 64, 64, 4
    else:
        target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    tiles_n = triton.cdiv(n, bn)
    # split K so that there are ~4 programs per SM, each over whole BLOCK_K steps
    steps = triton.cdiv(k, bk)
    splits = max(1, min(steps, target // max(tiles_n, 1)))
    k_per_split = triton.cdiv(steps, splits) * bk
    splits = triton.cdiv(k, k_per_split)
    aligned, grp = _aligned(group, bk, k)
    part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    _qmv_kernel[(tiles_n, splits)](
        x, qweight, qzeros, scales, g_idx, part,
        m, n, k, grp, k_per_split,
        x.stride(0), x.stride(1),
        qweight.stride(0), qzeros.stride(0), scales.stride(0),
        BITS=bits, ALIGNED=aligned, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )  # fmt: skip
    y = part.sum(0) if splits > 1 else part[0]
    if bias is not None:
        y = y + bias.float()
    return out.copy_(y)
