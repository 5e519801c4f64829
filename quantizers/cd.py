"""Coordinate-descent refinement after GPTQ (COMQ, Zhang et al., arXiv 2403.07134), as MagR's
reference code applies it.

GPTQ decides each column once, against weights it has already changed (and, with MagR, against
the magnitude-reduced weights). COMQ then revisits the columns one at a time and re-picks each
column's codes, on the same grid, to minimise the damped output error against the *original*
weights W:

    ‖X(W − Q)ᵀ‖² + λ·‖W − Q‖²,    λ = damp · mean(diag H).

For one column j the objective is a 1-D convex quadratic in each row's q_j, so rounding its
unconstrained minimiser u_j = ([W(H+λI)]_j − Σ_{i≠j} Q_i H_ij) / (H_jj + λ) to the grid is the
exact coordinate minimiser: a sweep never increases the damped objective. The reference uses
λ = 0.75·mean(diag H) and 1 sweep (30 at 2-bit). Unlike the reference, the grid (scales and
zeros) is kept as GPTQ chose it rather than re-fitted to the quantized values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantizers.rtn import QuantResult, quantize_codes

CD_DAMP = 0.75
BLOCK_SIZE = 128


def cd_refine(
    W: Tensor, result: QuantResult, H: Tensor, sweeps: int = 1, damp: float = CD_DAMP
) -> QuantResult:
    """Refine `result` (a quantization of some W′ ≈ W) by `sweeps` passes of coordinate descent
    against the original weights W [out, in] and input Hessian H [in, in]."""
    if sweeps <= 0:
        return result
    W = W.float()
    H = H.float()
    rows, cols = W.shape
    maxq = 2**result.bits - 1
    g = result.g_idx.long()
    S = result.scales.t()[:, g].contiguous()  # scale of every weight, [out, in]
    Z = result.zeros.t()[:, g].float().contiguous()
    codes = result.codes.float().clone()
    Q = (codes - Z) * S
    lam = damp * float(H.diagonal().mean())
    Hd = H.diagonal()
    target = W @ H + lam * W  # W(H + λI), fixed across sweeps
    for _ in range(sweeps):
        R = target - Q @ H  # R[:, j] = [W(H+λI)]_j − Σ_i Q_i H_ij
        for i1 in range(0, cols, BLOCK_SIZE):
            i2 = min(i1 + BLOCK_SIZE, cols)
            Delta = torch.zeros(rows, i2 - i1, device=W.device)
            for j in range(i1, i2):
                u = (R[:, j] + Q[:, j] * Hd[j]) / (Hd[j] + lam)
                c = quantize_codes(u, S[:, j], Z[:, j], maxq)
                q = (c - Z[:, j]) * S[:, j]
                dq = q - Q[:, j]
                R[:, j + 1 : i2] -= dq[:, None] * H[j, j + 1 : i2][None, :]
                Q[:, j], codes[:, j] = q, c
                Delta[:, j - i1] = dq
            R[:, i2:] -= Delta @ H[i1:i2, i2:]
    return QuantResult(
        codes.to(torch.uint8),
        result.scales,
        result.zeros,
        result.g_idx,
        result.bits,
        result.damp_percent,
    )
