"""MagR: the ℓ∞ prox against Duchi's sorted projection, the accelerated solver against the
paper's plain fp32 200-iteration run (objective within 1%, quantization error no worse), and the
effect it is for: smaller max |w|, same outputs, better 2-bit quantization."""

import pytest
import torch
from quant_problems import output_error, structured_problem

from quantizers.config import default_beta
from quantizers.gptq import gptq_quantize
from quantizers.magr import group_linf_prox, lambda_max, linf_prox, magr, magr_objective
from quantizers.report import median_max_abs
from quantizers.rtn import rtn_quantize


def project_l1_ball_sorted(x: torch.Tensor, radius: float = 1.0) -> torch.Tensor:
    """Duchi et al. (2008), batched over rows, with a full sort: the reference's projection."""
    x = x.double()
    mu = torch.sort(x.abs(), dim=1, descending=True).values
    cums = torch.cumsum(mu, dim=1)
    j = torch.arange(1, x.shape[1] + 1, dtype=torch.float64)
    rho = ((mu * j > cums - radius) * j).amax(dim=1).long()  # largest j with μ_j > θ_j
    theta = (cums.gather(1, (rho - 1)[:, None]) - radius) / rho[:, None]
    proj = torch.sign(x) * (x.abs() - theta).clamp(min=0)
    inside = x.abs().sum(dim=1, keepdim=True) <= radius
    return torch.where(inside, x, proj)


def prox_reference(V: torch.Tensor, alpha: float, group_size: int = -1) -> torch.Tensor:
    """prox of α‖·‖∞ by Moreau: v − α·proj_{‖·‖₁≤1}(v/α), per row or per group."""
    if group_size == -1:
        return (V.double() - alpha * project_l1_ball_sorted(V / alpha)).to(V.dtype)
    out = V.clone()
    for a in range(0, V.shape[1], group_size):
        out[:, a : a + group_size] = prox_reference(V[:, a : a + group_size], alpha)
    return out


def plain_magr_reference(W, H, alpha, group_size, iters=200):
    """The paper's solver in plain fp32: Ĥ = H/λmax (eigvalsh), step 1, sorted projection."""
    H_hat = H / torch.linalg.eigvalsh(H)[-1]
    X = W.clone()
    for _ in range(iters):
        X = prox_reference(X - (X - W) @ H_hat, alpha, group_size)
    return X


@pytest.mark.parametrize("alpha", [1e-4, 1e-2, 0.3, 50.0])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_prox_matches_sorted_projection(alpha, group_size):
    g = torch.Generator().manual_seed(3)
    V = torch.randn(24, 80, generator=g) * 0.1  # 80 = 32 + 32 + 16: a partial last group
    V[3] = 0.0  # an all-zero row
    V[4, :5] = 0.7  # ties at the maximum
    expected = prox_reference(V.double(), alpha, group_size)
    got = group_linf_prox(V, alpha, group_size)
    assert torch.allclose(got.double(), expected, atol=1e-6)
    if alpha == 50.0:  # ‖v‖₁ ≤ α for every row or group: the prox is 0
        assert torch.equal(got, torch.zeros_like(V))


def test_prox_clips_each_row_at_one_threshold():
    v = torch.tensor([[3.0, -2.0, 0.5, 1.0]])
    # Σ(|v| − t)₊ = 1.5 → t = 1.75 (3 − t + 2 − t = 1.5)
    assert torch.allclose(linf_prox(v, 1.5), torch.tensor([[1.75, -1.75, 0.5, 1.0]]))


def test_lambda_max_power_iteration_matches_eigvalsh():
    for seed in range(3):
        _, _, H = structured_problem(in_features=200, seed=seed)
        exact = float(torch.linalg.eigvalsh(H.double())[-1])
        assert lambda_max(H) == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("group_size, alpha", [(-1, 1e-3), (32, 1e-4)])
def test_fast_magr_reaches_the_plain_200_iteration_objective(group_size, alpha):
    W, X, H = structured_problem()
    H_hat = H / torch.linalg.eigvalsh(H)[-1]
    reference = plain_magr_reference(W, H, alpha, group_size)
    F_ref = magr_objective(reference, W, H_hat, alpha, group_size)
    assert F_ref < magr_objective(W, W, H_hat, alpha, group_size)  # it did something

    plain = magr(W, H, alpha, iters=200, group_size=group_size, accelerate=False)
    assert magr_objective(plain, W, H_hat, alpha, group_size) == pytest.approx(F_ref, rel=1e-4)

    bits = 2 if group_size == -1 else 3
    beta = default_beta(bits, group_size)
    ref_err = output_error(W, rtn_quantize(reference, bits, group_size, beta=beta).dequantize(), X)
    for dtype in (None, torch.bfloat16):  # the defaults, in fp32 and with bf16 matmuls
        fast = magr(W, H, alpha, group_size=group_size, matmul_dtype=dtype)
        F = magr_objective(fast, W, H_hat, alpha, group_size)
        assert 1.01 * F_ref >= F, (dtype, F / F_ref)
        err = output_error(W, rtn_quantize(fast, bits, group_size, beta=beta).dequantize(), X)
        assert err <= ref_err * 1.002, (dtype, err, ref_err)


def test_magr_shrinks_max_weights_and_keeps_outputs():
    W, X, H = structured_problem()
    W_magr = magr(W, H, 1e-3)
    assert median_max_abs(W_magr, -1) < 0.6 * median_max_abs(W, -1)  # measured 0.47
    assert output_error(W, W_magr, X) < 0.1  # measured 0.06


def test_magr_then_gptq_beats_gptq_at_2_bits():
    W, X, H = structured_problem()
    gptq = output_error(W, gptq_quantize(W, H, 2).dequantize(), X)
    W_magr = magr(W, H, 1e-3)
    both = gptq_quantize(W_magr, H, 2, beta=default_beta(2, -1)).dequantize()
    assert output_error(W, both, X) < 0.9 * gptq
