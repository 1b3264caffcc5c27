import pytest
import torch

from malmen.solver import NormalEquation, SumAggregation, cholesky, value_differences


def random_problem(n=7, a=5, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, a, generator=g, dtype=torch.float64)
    pkeys = torch.randn(n, a, generator=g, dtype=torch.float64)
    pgrads = torch.randn(n, b, generator=g, dtype=torch.float64)
    G = torch.randn(a, b, generator=g, dtype=torch.float64)
    return keys, pkeys, pgrads, G


def test_backward_through_solve_matches_autograd():
    keys, pkeys, pgrads, G = random_problem()
    eta = torch.tensor(0.3, dtype=torch.float64)
    lam = torch.tensor(0.7, dtype=torch.float64)

    # autograd reference through torch.linalg.solve
    pk, pg, lam_r, eta_r = (x.clone().requires_grad_() for x in (pkeys, pgrads, lam, eta))
    D = value_differences(keys, pk, pg, eta_r)
    S = torch.linalg.solve(keys.t() @ keys + lam_r * torch.eye(keys.shape[1], dtype=torch.float64), keys.t() @ D)
    (S * G).sum().backward()

    agg = NormalEquation(keys.shape[1], pgrads.shape[1])
    agg.accumulate(keys, pkeys, pgrads, eta)
    ours_S = agg.solve(lam)
    assert torch.allclose(ours_S.double(), S.detach(), atol=1e-5)
    dlam = agg.backward(G)
    assert torch.allclose(dlam.double(), lam_r.grad, rtol=1e-4)
    pk2, pg2, eta2 = (x.clone().requires_grad_() for x in (pkeys, pgrads, eta))
    agg.surrogate(keys, pk2.float(), pg2.float(), eta2.float()).backward()
    assert torch.allclose(pk2.grad, pk.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(pg2.grad, pg.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(eta2.grad, eta_r.grad, rtol=1e-4)


def test_sum_aggregation_backward_matches_autograd():
    keys, pkeys, pgrads, G = random_problem(seed=1)
    eta = torch.tensor(0.5, dtype=torch.float64)
    pk, pg = pkeys.clone().requires_grad_(), pgrads.clone().requires_grad_()
    S = -eta * pk.t() @ pg
    (S * G).sum().backward()
    agg = SumAggregation(keys.shape[1], pgrads.shape[1])
    agg.accumulate(keys, pkeys.float(), pgrads.float(), eta.float())
    assert torch.allclose(agg.solve().double(), S.detach(), atol=1e-5)
    agg.backward(G)
    pk2, pg2 = pkeys.float().requires_grad_(), pgrads.float().requires_grad_()
    agg.surrogate(keys, pk2, pg2, eta.float()).backward()
    assert torch.allclose(pk2.grad.double(), pk.grad, atol=1e-5)
    assert torch.allclose(pg2.grad.double(), pg.grad, atol=1e-5)


def test_streaming_sums_equal_dense_solve():
    keys, pkeys, pgrads, _ = random_problem(n=50, a=8, b=4, seed=2)
    keys, pkeys, pgrads = keys.float(), pkeys.float(), pgrads.float()
    eta, lam = torch.tensor(0.2), 0.1
    streamed = NormalEquation(8, 4)
    for s in range(0, 50, 7):
        streamed.accumulate(keys[s:s + 7], pkeys[s:s + 7], pgrads[s:s + 7], eta)
    K, D = keys.double(), value_differences(keys, pkeys, pgrads, eta).double()
    dense = torch.linalg.solve(K.t() @ K + lam * torch.eye(8, dtype=torch.float64), K.t() @ D)
    assert torch.allclose(streamed.solve(lam).double(), dense, atol=1e-5)
    assert streamed.tokens == 50


def test_fewer_tokens_than_key_size_and_identical_keys_stay_finite():
    agg = NormalEquation(16, 4)
    k = torch.ones(3, 16)  # identical keys, n < a
    agg.accumulate(k, torch.randn(3, 16), torch.randn(3, 4), torch.tensor(1.0))
    S = agg.solve(1e-3)
    assert torch.isfinite(S).all()
    # the solve fits the (averaged) target on the shared key
    assert S.abs().sum() > 0


def test_cholesky_jitter_warns_on_singular_matrix():
    m = torch.zeros(4, 4, dtype=torch.float64)
    m[0, 0] = 1.0
    with pytest.warns(RuntimeWarning, match="ill-conditioned"):
        factor = cholesky(m)
    assert torch.isfinite(factor).all()
