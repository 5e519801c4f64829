"""Triton kernels for the packed GPTQ layout: dequantize in registers, multiply, never write W.
(One file over 400 lines: the kernels and the launchers that pick their tiles share constexprs.)

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

from typing import NamedTuple

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
def _unpack3(
    qw_ptr, k0, offs_n, mask_n, K, stride_qw, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr
):
    """3-bit codes of rows k0 .. k0 + BLOCK_K (k0 and BLOCK_K multiples of 32) as int32.

    Every 32 rows are 3 whole words: load them as three coalesced [BLOCK_K/32, BLOCK_N] planes,
    each word read once, and cut the 32 fields out with constant shifts. Reading each field
    where it lies (two gathered loads per value) instead needs a 64-bit address per value and
    spilled registers at GEMM tile sizes."""
    R: tl.constexpr = BLOCK_K // 32
    rows = k0 // 32 + tl.arange(0, R)
    wmask = (rows < K // 32)[:, None] & mask_n[None, :]
    base = qw_ptr + (rows * 3)[:, None] * stride_qw + offs_n[None, :]
    w0 = tl.load(base, mask=wmask, other=0).to(tl.uint32, bitcast=True)[:, None, :]
    w1 = tl.load(base + stride_qw, mask=wmask, other=0).to(tl.uint32, bitcast=True)[:, None, :]
    w2 = tl.load(base + 2 * stride_qw, mask=wmask, other=0).to(tl.uint32, bitcast=True)
    w2 = w2[:, None, :]
    pos = tl.arange(0, 32) * 3  # bit offset of field i in the 96-bit stream of 3 words
    word = (pos >> 5)[None, :, None]
    shift = (pos & 31)[None, :, None].to(tl.uint32)
    lo = tl.where(word == 0, w0, tl.where(word == 1, w1, w2))
    hi = tl.where(word == 0, w1, w2)  # the next word, for fields 10 and 21 that straddle
    up = tl.where(shift > 29, 32 - shift, 0).to(tl.uint32)
    v = (lo >> shift) | tl.where(shift > 29, hi << up, 0).to(tl.uint32)
    return tl.reshape(v & 7, (BLOCK_K, BLOCK_N)).to(tl.int32)


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
        q = _unpack3(qw_ptr, k0, offs_n, mask_n, K, stride_qw, BLOCK_K, BLOCK_N)
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
# launchers: each builds a Launch (what the JIT compiles and runs) from the tensors; the
# ahead-of-time compile test (quantizers/kernels/aot.py) builds the same Launches from meta
# tensors and compiles them for real GPU targets.


class Launch(NamedTuple):
    kernel: triton.runtime.JITFunction
    grid: tuple[int, ...]
    args: tuple
    meta: dict  # constexprs, num_warps and num_stages

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)


class Tile(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int = 3


def gemm_tile(m: int, dtype: torch.dtype, bits: int) -> Tile:
    """The forward GEMM's tile. Small tiles for the interpreter (numpy per program) and for short
    M; a conventional 128×128×32 tile for training-size M on GPU. Every choice compiles without
    register spills for sm_80/86/89/90/120 (tests/test_kernels_aot.py). Untuned: the GPU suite
    (benchmarks/gpu_suite.py) is where these get chosen."""
    if INTERPRETED:  # 64-wide tiles leave ragged edges at the tests' K, N (multiples of 32)
        return Tile(16, 64, 64, 4)
    if dtype == torch.float32:  # an IEEE fp32 dot runs on the FMA units: register hungry
        return Tile(16, 32, 32, 4)
    if m <= 64:
        return Tile(16, 128, 64, 4)
    return Tile(128, 128, 32, 8)


def dx_tile(m: int, dtype: torch.dtype, bits: int) -> Tile:
    """The input-gradient GEMM's tile: forward's with N and K swapped (K is the output tile
    here, N the reduction), at least 32 rows of K (whole packed words at every bit width)."""
    t = gemm_tile(m, dtype, bits)
    return t._replace(block_n=t.block_k, block_k=max(t.block_n, 32))


class GemvPlan(NamedTuple):
    tile: Tile
    splits: int
    k_per_split: int


def gemv_tile(m: int) -> Tile:
    """The decode GEMV's tile: BLOCK_M covers all M rows."""
    bm = triton.next_power_of_2(m)
    if INTERPRETED:
        return Tile(bm, 64, 64, 4)
    # wider tiles or 8 warps leave small register spills on sm_90 (tests/test_kernels_aot.py)
    return Tile(bm, 32, 64, 4) if bm <= 2 else Tile(bm, 64, 32, 4)


def variant(kind: str, m: int, k: int, dtype: torch.dtype, bits: int, group: int | None) -> tuple:
    """What decides which compiled kernel a launch runs (kind "fwd" or "dx"): the kernel, its
    tile and ALIGNED, from the same rules as the launchers. Keys the first-use self-check."""
    if kind == "fwd" and m <= GEMV_MAX_M:
        t = gemv_tile(m)
        return ("gemv", *t, _aligned(group, t.block_k, k)[0])
    t = gemm_tile(m, dtype, bits) if kind == "fwd" else dx_tile(m, dtype, bits)
    aligned = _aligned(group, t.block_k, k)[0]
    if not aligned and not INTERPRETED:
        t = gathered_tile(t, bits, kind)
    return (kind, *t, aligned)


def gemv_plan(m: int, n: int, k: int, programs: int) -> GemvPlan:
    """Tile and K split of the decode GEMV for about `programs` programs in flight. The
    [BLOCK_M, BLOCK_K, BLOCK_N] product lives in registers: ≤ 64 floats a thread."""
    t = gemv_tile(m)
    bn, bk = t.block_n, t.block_k
    tiles_n = triton.cdiv(n, bn)
    steps = triton.cdiv(k, bk)  # each split covers whole BLOCK_K steps
    splits = max(1, min(steps, programs // max(tiles_n, 1)))
    k_per_split = triton.cdiv(steps, splits) * bk
    return GemvPlan(t, triton.cdiv(k, k_per_split), k_per_split)


def gathered_tile(t: Tile, bits: int, kind: str) -> Tile:
    """The tile when scales and zeros are gathered per row (act-order, or groups that tiles
    straddle): those [BLOCK_K, BLOCK_N] gathers, pipelined over 3 stages, need up to 190 KB of
    shared memory (over sm_86/89's 99 KB) and spill registers. Fewer stages (none at 3 bits)
    and narrower output tiles keep every target within limits (tests/test_kernels_aot.py)."""
    small = t.block_m <= 16
    if kind == "dx":  # K is the output tile here: shorter K tiles hold fewer gathered rows
        t = t._replace(block_k=min(t.block_k, 32 if small or bits == 3 else 64))
    elif small or bits == 3:
        t = t._replace(block_n=min(t.block_n, 64))
    return t._replace(num_stages=1 if bits == 3 else 2)


def _aligned(group: int | None, block_k: int, k: int) -> tuple[bool, int]:
    """Whether tiles of BLOCK_K rows never straddle a group (so one scale row per tile)."""
    if group is None:
        return False, k
    return (group >= k or group % block_k == 0), max(group, 1)


def _check(x: Tensor, qweight: Tensor, bits: int, k: int) -> None:
    """The kernels index the packed buffers assuming contiguous rows."""
    if not qweight.is_contiguous():
        raise ValueError("packed buffers must be contiguous")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits={bits}: the Triton kernels support 2, 3, 4 and 8")
    if qweight.shape[0] * 32 != k * bits:
        raise ValueError(f"qweight rows {qweight.shape[0]} do not hold K={k} values of {bits} bits")


def forward_launch(x, qweight, qzeros, scales, g_idx, bits, bias, group, y) -> Launch:
    """The GEMM Y = X · W (+ bias) into y [M, N]."""
    m, k = x.shape
    n = scales.shape[1]
    t = gemm_tile(m, x.dtype, bits)
    aligned, grp = _aligned(group, t.block_k, k)
    if not aligned and not INTERPRETED:
        t = gathered_tile(t, bits, "fwd")
    args = (
        x, qweight, qzeros, scales, g_idx, bias if bias is not None else y, y,
        m, n, k, grp,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        qweight.stride(0), qzeros.stride(0), scales.stride(0),
    )  # fmt: skip
    meta = dict(
        BITS=bits, ALIGNED=aligned, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=8,
        num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    grid = (triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n),)
    return Launch(_qmm_fwd_kernel, grid, args, meta)


def dx_launch(dy, qweight, qzeros, scales, g_idx, bits, group, dx) -> Launch:
    """The GEMM dX = dY · Wᵀ into dx [M, K]."""
    m, n = dy.shape
    k = g_idx.shape[0]
    t = dx_tile(m, dy.dtype, bits)
    aligned, grp = _aligned(group, t.block_k, k)
    if not aligned and not INTERPRETED:
        t = gathered_tile(t, bits, "dx")
    args = (
        dy, qweight, qzeros, scales, g_idx, dx,
        m, n, k, grp,
        dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
        qweight.stride(0), qzeros.stride(0), scales.stride(0),
    )  # fmt: skip
    meta = dict(
        BITS=bits, ALIGNED=aligned, IEEE=dy.dtype == torch.float32,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=8,
        num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    grid = (triton.cdiv(m, t.block_m) * triton.cdiv(k, t.block_k),)
    return Launch(_qmm_dx_kernel, grid, args, meta)


def gemv_launch(x, qweight, qzeros, scales, g_idx, bits, group, plan: GemvPlan, part) -> Launch:
    """The split-K GEMV's partial sums into part [splits, M, N] (fp32)."""
    m, k = x.shape
    n = scales.shape[1]
    t = plan.tile
    aligned, grp = _aligned(group, t.block_k, k)
    args = (
        x, qweight, qzeros, scales, g_idx, part,
        m, n, k, grp, plan.k_per_split,
        x.stride(0), x.stride(1),
        qweight.stride(0), qzeros.stride(0), scales.stride(0),
    )  # fmt: skip
    meta = dict(
        BITS=bits, ALIGNED=aligned, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
        num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    return Launch(_qmv_kernel, (triton.cdiv(n, t.block_n), plan.splits), args, meta)


def _programs(device: torch.device) -> int:
    """Programs to keep in flight for the GEMV: ~4 per SM."""
    if INTERPRETED:
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


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
        plan = gemv_plan(m, n, k, _programs(x.device))
        part = torch.empty(plan.splits, m, n, dtype=torch.float32, device=x.device)
        gemv_launch(x, qweight, qzeros, scales, g_idx, bits, group, plan, part).run()
        out = part.sum(0) if plan.splits > 1 else part[0]
        if bias is not None:
            out = out + bias.float()
        return y.copy_(out)
    forward_launch(x, qweight, qzeros, scales, g_idx, bits, bias, group, y).run()
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
    m, _ = dy.shape
    k = g_idx.shape[0]
    _check(dy, qweight, bits, k)
    dx = torch.empty(m, k, dtype=dy.dtype, device=dy.device)
    dx_launch(dy, qweight, qzeros, scales, g_idx, bits, group, dx).run()
    return dx
