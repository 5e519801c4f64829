"""GPTQ (Frantar et al., 2023): quantize one column at a time and push each column's rounding
error onto the columns not yet quantized, weighted by the inverse input Hessian.

With H = XᵀX/n, the output error ‖X(W−Q)ᵀ‖² is what GPTQ keeps small. Quantizing column j
with error e_j = (w_j − q_j) / [H⁻¹]_jj is optimally compensated by W[:, j+1:] −= e_j·U[j, j+1:],
where U is the upper Cholesky factor of H⁻¹. Updates are applied lazily: inside a block of
columns immediately, to the rest of the matrix once per block (one matmul).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from quantizers.rtn import QuantResult, find_grid, group_slices, quantize_codes

log = logging.getLogger(__name__)

BLOCK_SIZE = 128
DAMP_RETRIES = 3  # each retry multiplies the damping by 10


class CholeskyError(ValueError):
    """The damped Hessian is still not positive definite (names the layer)."""


def inverse_cholesky(H: Tensor, damp_percent: float, name: str = "layer") -> Tensor:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹, retrying with 10× the damping
    when the factorisation fails (an ill-conditioned H, e.g. from too few calibration tokens)."""
    return damped_inverse_cholesky(H, damp_percent, name)[0]


def damped_inverse_cholesky(
    H: Tensor, damp_percent: float, name: str = "layer"
) -> tuple[Tensor, float]:
    """`inverse_cholesky`, also returning the damping that succeeded."""
    if not bool(torch.isfinite(H).all()):
        raise CholeskyError(f"{name}: the calibration Hessian holds NaN or Inf values")
    mean_diag = float(H.diagonal().mean())
    damp = damp_percent
    for attempt in range(DAMP_RETRIES + 1):
        # Each in×in temporary is dropped as soon as the next exists: with H and its owner's copy
        # that is four at most (docs/scale.md counts them), the largest memory GPTQ takes.
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if int(info) == 0:
            inverse = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U, damp
        if attempt < DAMP_RETRIES:
            log.warning(
                "%s: Cholesky failed with damp_percent=%g; retrying with %g",
                name,
                damp,
                damp * 10,
            )
            damp *= 10
    raise CholeskyError(
        f"{name}: the Hessian is not positive definite even with damp_percent={damp:g}; "
        "use more calibration tokens or a larger damp_percent"
    )


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    bits: int,
    group_size: int = -1,
    sym: bool = False,
    beta: float = 1.0,
    damp_percent: float = 0.01,
    desc_act: bool = False,
    static_groups: bool = False,
    min_zero: int = 0,
    name: str = "layer",
) -> QuantResult:
    """GPTQ-quantize W [out, in] given the input Hessian H [in, in].

    desc_act: quantize columns in order of decreasing diag(H) (act-order); groups are then formed
        in that order, so g_idx is not monotone, unless static_groups.
    static_groups: compute every group's grid up front from the unquantized W (natural order);
        otherwise each group's grid comes from the already-updated weights when GPTQ reaches it.
    The last group is partial when group_size does not divide in (g_idx maps columns to groups).
    """
    W = W.float().clone()
    H = H.float().clone()
    rows, cols = W.shape
    maxq = 2**bits - 1
    dead = H.diagonal() == 0  # inputs that were always 0: any weight works, 0 is cheapest
    H[dead, dead] = 1
    W[:, dead] = 0

    g = cols if group_size == -1 else group_size
    slices = group_slices(cols, group_size)
    scales = torch.zeros(len(slices), rows, device=W.device)
    zeros = torch.zeros(len(slices), rows, device=W.device)
    dynamic = group_size != -1 and not static_groups
    if not dynamic:  # per-channel, or static groups: every grid is known before GPTQ starts
        for k, (a, b) in enumerate(slices):
            scales[k], zeros[k] = find_grid(W[:, a:b], bits, sym, beta, min_zero)

    perm = torch.argsort(H.diagonal(), descending=True) if desc_act else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U, damp = damped_inverse_cholesky(H, damp_percent, name)
    del H  # only its inverse's factor is used from here on

    # Blocks hold whole groups, so a group's grid is taken from fully updated weights.
    block = g * max(1, BLOCK_SIZE // g) if dynamic else BLOCK_SIZE
    natural = torch.arange(cols, device=W.device)
    source = natural if perm is None else perm  # original column of each processed column
    group_of = (natural // g) if dynamic else (source // g)  # group of each processed column
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            k = int(group_of[j])
            if dynamic and j % g == 0:
                scales[k], zeros[k] = find_grid(W1[:, i : i + g], bits, sym, beta, min_zero)
            scale, zero = scales[k], zeros[k]
            w = W1[:, i]
            q = quantize_codes(w, scale, zero, maxq)
            codes[:, j] = q.to(torch.uint8)
            err = (w - scale * (q - zero)) / U1[i, i]
            W1[:, i + 1 :] -= err[:, None] * U1[i, i + 1 :][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    g_idx = group_of.to(torch.int32)
    if perm is not None:
        inv = torch.argsort(perm)
        codes, g_idx = codes[:, inv], g_idx[inv]
    return QuantResult(codes, scales, zeros.to(torch.int32), g_idx, bits, damp_percent=damp)
