"""RTN, GPTQ and coordinate descent on tensors with a known structure."""

import itertools

import pytest
import torch
from quant_problems import output_error, structured_problem

from quantizers.cd import cd_refine
from quantizers.gptq import CholeskyError, gptq_quantize, inverse_cholesky
from quantizers.report import relative_output_error
from quantizers.rtn import find_grid, rtn_quantize


def rtn_reference(W, bits, group_size, sym=False):
    """Min-max round-to-nearest written out group by group, row by row."""
    maxq = 2**bits - 1
    Q = torch.empty_like(W)
    for r in range(W.shape[0]):
        for a in range(0, W.shape[1], group_size):
            w = W[r, a : a + group_size]
            lo, hi = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
            if sym:
                m = max(-lo, hi)
                lo, hi = -m, m
            scale = float(torch.tensor((hi - lo) / maxq).half())
            zero = 2 ** (bits - 1) if sym else min(max(round(-lo / scale), 0), maxq)
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            Q[r, a : a + group_size] = scale * (q - zero)
    return Q


@pytest.mark.parametrize("bits, group_size, sym", [(3, 64, False), (4, 32, True), (2, 128, False)])
def test_rtn_matches_groupwise_reference_with_partial_last_group(bits, group_size, sym):
    W, _, _ = structured_problem(out_features=16, in_features=160)  # 160 = 64+64+32 at g64
    result = rtn_quantize(W, bits, group_size, sym)
    groups = -(-160 // group_size)
    assert result.scales.shape == (groups, 16) and result.g_idx.shape == (160,)
    assert int(result.g_idx[-1]) == groups - 1
    assert torch.allclose(result.dequantize(), rtn_reference(W, bits, group_size, sym), atol=1e-6)


def test_grid_beta_and_min_zero():
    w = torch.tensor([[-1.0, 0.5, 2.0], [0.25, 0.5, 1.0]])
    scale, zero = find_grid(w, 2, sym=False, beta=0.8)
    assert torch.allclose(scale, torch.tensor([0.8 * 3 / 3, 0.8 * 1 / 3]).half().float())
    assert zero.tolist() == [1.0, 0.0]  # the second row is all positive: zero point 0
    _, zero = find_grid(w, 2, sym=False, min_zero=1)
    assert zero.tolist() == [1.0, 1.0]  # kept off 0 for the v1 format
    scale, zero = find_grid(w, 4, sym=True)
    assert zero.tolist() == [8.0, 8.0]
    assert torch.allclose(scale, torch.tensor([4 / 15, 2 / 15]).half().float())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_gptq_output_error_is_well_below_rtn(bits, group_size):
    W, X, H = structured_problem()
    rtn = output_error(W, rtn_quantize(W, bits, group_size).dequantize(), X)
    gptq = output_error(W, gptq_quantize(W, H, bits, group_size).dequantize(), X)
    assert gptq < 0.7 * rtn, (gptq, rtn)


# A reference decision closer than this to a rounding boundary (in units of the grid step, or of
# an fp16 ulp for a scale) may go either way under float32 rounding of the lazy-batched updates.
TIE_MARGIN = 1e-4


def _near_tie(x: torch.Tensor) -> torch.Tensor:
    """Whether x (float64) lies within TIE_MARGIN of a .5 rounding boundary."""
    return (x - torch.floor(x) - 0.5).abs() < TIE_MARGIN


def _fp16_near_tie(s: torch.Tensor) -> torch.Tensor:
    """Whether rounding s (float64, positive, in fp16's normal range) to fp16 is near a tie."""
    ulp = torch.exp2(torch.floor(torch.log2(s)) - 10)
    return _near_tie(s / ulp)


def gptq_reference(W, H, bits, group_size=-1, damp=0.01, act_order=False, static_groups=False):
    """IST-DASLab's GPTQ (fasterquant), transcribed column by column, in float64, with no lazy
    batching. Scales are rounded to fp16 as the checkpoint stores them. Returns the codes, the
    dequantized weights and, per row, whether any rounding decision was a near-tie."""
    W, H = W.double().clone(), H.double().clone()
    rows, cols = W.shape
    maxq = 2**bits - 1
    tie = torch.zeros(rows, dtype=torch.bool)

    def find_params(x):
        nonlocal tie
        xmin = torch.clamp(x.min(dim=1).values, max=0)
        xmax = torch.clamp(x.max(dim=1).values, min=0)
        both = (xmin == 0) & (xmax == 0)
        xmin[both], xmax[both] = -1.0, 1.0
        exact = (xmax - xmin) / maxq
        scale = exact.half().double()
        tie |= _fp16_near_tie(exact) | _near_tie(-xmin / scale)
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)  # the layout stores 0..maxq
        return scale, zero

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    g = cols if group_size == -1 else group_size
    natural_grids = None
    if group_size == -1 or static_groups:
        natural_grids = [find_params(W[:, a : a + g]) for a in range(0, cols, g)]
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    codes = torch.zeros(rows, cols, dtype=torch.long)
    Q = torch.zeros(rows, cols, dtype=torch.float64)
    for i in range(cols):
        if natural_grids is not None:
            scale, zero = natural_grids[int(perm[i]) // g]
        elif i % g == 0:
            scale, zero = find_params(W[:, i : i + g])
        w = W[:, i]
        tie |= _near_tie(w / scale)
        q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
        codes[:, i], Q[:, i] = q.long(), scale * (q - zero)
        err = (w - Q[:, i]) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
    inv = torch.argsort(perm)
    return codes[:, inv], Q[:, inv], tie


@pytest.mark.parametrize(
    "bits, group_size, act_order, static_groups",
    [(4, -1, False, False), (3, 32, False, False), (2, 32, True, False), (4, 64, True, True)],
)
def test_gptq_matches_a_column_by_column_reference(bits, group_size, act_order, static_groups):
    # 200 columns: two lazy batches of 128, and a partial last group (8 columns) at g32 and g64
    W, _, H = structured_problem(out_features=16, in_features=200, tokens=512)
    result = gptq_quantize(W, H, bits, group_size, desc_act=act_order, static_groups=static_groups)
    codes, Q, tie = gptq_reference(
        W, H, bits, group_size, act_order=act_order, static_groups=static_groups
    )
    assert int(tie.sum()) <= 2, "too many near-ties for the comparison to mean anything"
    keep = ~tie
    assert torch.equal(result.codes.long()[keep], codes[keep])
    # fp16 scales times small integers: the dequantized weights are exact in float32
    assert torch.equal(result.dequantize()[keep], Q.float()[keep])


def test_gptq_options_desc_act_and_static_groups():
    W, X, H = structured_problem(in_features=160)  # partial last group at g64
    rtn = output_error(W, rtn_quantize(W, 3, 64).dequantize(), X)
    act = gptq_quantize(W, H, 3, 64, desc_act=True)
    # act-order groups follow the permutation: g_idx is not monotone, but each group still
    # holds 64 columns (the last 32)
    assert not bool((act.g_idx[1:] >= act.g_idx[:-1]).all())
    assert torch.bincount(act.g_idx.long()).tolist() == [64, 64, 32]
    static = gptq_quantize(W, H, 3, 64, desc_act=True, static_groups=True)
    assert torch.equal(static.g_idx, (torch.arange(160) // 64).to(torch.int32))
    for result in (act, static):
        assert output_error(W, result.dequantize(), X) < 0.7 * rtn
    # static groups: the grids are those of RTN on the unquantized weights
    assert torch.equal(static.scales, rtn_quantize(W, 3, 64).scales)


def test_gptq_on_stacked_rows_equals_one_call_per_layer():
    W, _, H = structured_problem(out_features=96)
    both = gptq_quantize(W, H, 3, 32)
    top, bottom = gptq_quantize(W[:40], H, 3, 32), gptq_quantize(W[40:], H, 3, 32)
    agree = (both.codes == torch.cat([top.codes, bottom.codes])).float().mean()
    assert agree > 0.999  # rows are independent given H (float rounding may differ)


def test_dead_inputs_get_zero_weight():
    W, X, _ = structured_problem()
    X[:, 5] = 0
    H = X.t() @ X / X.shape[0]
    result = gptq_quantize(W, H, 4, 32)
    Q = result.dequantize()
    assert bool(torch.isfinite(Q).all())
    assert torch.equal(Q[:, 5], torch.zeros(W.shape[0]))
    assert output_error(W, Q, X) < 0.1


def test_cholesky_retries_with_more_damping_then_fails_clearly():
    n = 16
    H = torch.eye(n)
    H[0, 0] = -0.05  # indefinite: 1% damping is not enough, 10% is
    U = inverse_cholesky(H, 0.01, name="layers.3.mlp.up_proj")
    # the factor of the retry at 10x the damping: (H + 0.1·mean(diag H)·I)⁻¹ = UᵀU, U upper
    damped = H.double() + 0.1 * H.diagonal().double().mean() * torch.eye(n, dtype=torch.float64)
    expected = torch.linalg.cholesky(torch.linalg.inv(damped)).T
    torch.testing.assert_close(U.double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(CholeskyError, match=r"layers\.1\.q_proj: the Hessian is not positive"):
        inverse_cholesky(-torch.eye(n), 0.01, name="layers.1.q_proj")
    bad = torch.eye(n)
    bad[2, 3] = float("nan")
    with pytest.raises(CholeskyError, match="NaN or Inf"):
        inverse_cholesky(bad, 0.01, name="x")


def damped_objective(W, Q, H, lam):
    D = W - Q
    return float(((D @ H) * D).sum()) + lam * float((D * D).sum())


@pytest.mark.parametrize("damp", [0.01, 0.75])
def test_coordinate_descent_never_raises_its_objective_and_keeps_the_grid(damp):
    W, X, H = structured_problem()
    start = gptq_quantize(W, H, 2, 32)
    lam = damp * float(H.diagonal().mean())
    values = [damped_objective(W, start.dequantize(), H, lam)]
    result = start
    for _ in range(3):
        result = cd_refine(W, result, H, sweeps=1, damp=damp)
        values.append(damped_objective(W, result.dequantize(), H, lam))
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(values)), values
    assert values[-1] < values[0]
    assert result.scales is start.scales and result.zeros is start.zeros
    if damp == 0.01:  # lightly damped: it also lowers the plain output error
        assert output_error(W, result.dequantize(), X) < output_error(W, start.dequantize(), X)


def test_relative_output_error_from_H_matches_X():
    W, X, H = structured_problem()
    Q = rtn_quantize(W, 3, 32).dequantize()
    assert relative_output_error(W, Q, H) == pytest.approx(output_error(W, Q, X), rel=1e-4)
