import pytest
import torch

from malmen.solver import (AGGREGATIONS, JointNormalEquation, NormalEquation, Shape, SumAggregation, Tokens, cholesky,
                           report, value_differences)


def random_problem(n=7, a=5, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, a, generator=g, dtype=torch.float64)
    pkeys = torch.randn(n, a, generator=g, dtype=torch.float64)
    pgrads = torch.randn(n, b, generator=g, dtype=torch.float64)
    G = torch.randn(a, b, generator=g, dtype=torch.float64)
    return keys, pkeys, pgrads, G


def assert_like_autograd(solution, S, G, lam_r, keys, pkeys, pgrads, eta, pk, pg, atol=1e-6):
    """The solution's shift, lambda-gradient and surrogate gradients equal autograd's (S from
    leaves lam_r, pk, pg after ``(S * G).sum().backward()``)."""
    assert torch.allclose(solution.shift.double(), S.detach(), atol=atol)
    adjoint = solution.backward(G)
    assert torch.allclose(adjoint.dlam.double(), lam_r.grad, rtol=1e-4)
    pk2, pg2 = pkeys.float().requires_grad_(), pgrads.float().requires_grad_()
    adjoint.surrogate(Tokens(keys, pk2, pg2, eta.float())).backward()
    assert torch.allclose(pk2.grad.double(), pk.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(pg2.grad.double(), pg.grad, rtol=1e-4, atol=1e-5)


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
    agg.accumulate(Tokens(keys, pkeys, pgrads, eta))
    solution = agg.solve(lam)
    assert torch.allclose(solution.shift.double(), S.detach(), atol=1e-5)
    adjoint = solution.backward(G)
    assert torch.allclose(adjoint.dlam.double(), lam_r.grad, rtol=1e-4)
    pk2, pg2, eta2 = (x.clone().requires_grad_() for x in (pkeys, pgrads, eta))
    adjoint.surrogate(Tokens(keys, pk2.float(), pg2.float(), eta2.float())).backward()
    assert torch.allclose(pk2.grad, pk.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(pg2.grad, pg.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(eta2.grad, eta_r.grad, rtol=1e-4)


def test_dual_form_below_the_key_size_equals_autograd_and_the_primal_form():
    """Fewer tokens (5) than half the key dimensions (12): the solver keeps the tokens and solves the dual
    form; its shift, lambda-gradient and surrogate gradients equal autograd through the dense
    primal solve, and the folded (primal) sums give the same numbers."""
    keys, pkeys, pgrads, G = random_problem(n=5, a=12, b=3, seed=4)
    eta, lam = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    pk, pg, lam_r = (x.clone().requires_grad_() for x in (pkeys, pgrads, lam))
    D = value_differences(keys, pk, pg, eta)
    S = torch.linalg.solve(keys.t() @ keys + lam_r * torch.eye(12, dtype=torch.float64), keys.t() @ D)
    (S * G).sum().backward()

    dual, primal = NormalEquation(12, 3), NormalEquation(12, 3)
    for agg in (dual, primal):
        agg.accumulate(Tokens(keys[:2], pkeys[:2], pgrads[:2], eta))
        agg.accumulate(Tokens(keys[2:], pkeys[2:], pgrads[2:], eta))
    primal.fold()
    assert dual.A is None and primal.A is not None
    solutions = dual.solve(lam), primal.solve(lam)
    assert type(solutions[0]).__name__ == "DualSolution"
    for solution in solutions:
        assert_like_autograd(solution, S, G, lam_r, keys, pkeys, pgrads, eta, pk, pg)


def test_a_shaped_regulariser_solves_and_differentiates_like_autograd():
    """lambda P instead of lambda I (P SPD, e.g. the keys' second moment): the shift is
    (K^T K + lambda P)^-1 K^T D and its backward (lambda, pseudo keys and gradients) equals
    autograd, in the primal form and, with fewer tokens than half the key size, in the dual form
    over whitened keys K L^-T (P = L L^T), which gives the folded primal sums' numbers."""
    for n, a in ((7, 5), (3, 12)):
        keys, pkeys, pgrads, G = random_problem(n=n, a=a, b=3, seed=6)
        root = torch.randn(a, a, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        prior = root @ root.t() / a + 0.1 * torch.eye(a, dtype=torch.float64)
        eta, lam = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
        pk, pg, lam_r = (x.clone().requires_grad_() for x in (pkeys, pgrads, lam))
        D = value_differences(keys, pk, pg, eta)
        S = torch.linalg.solve(keys.t() @ keys + lam_r * prior, keys.t() @ D)
        (S * G).sum().backward()

        shape = Shape.of(prior.float(), "cpu")  # made once, its factor reused by every solve
        agg, folded = NormalEquation(a, 3, prior=shape), NormalEquation(a, 3, prior=prior.float())
        assert agg.white is shape.factor and Shape.of(shape, "cpu") is shape
        moved = Shape.of(shape, "meta")  # another device: a new shape, the matrix and its factor both moved there
        assert (moved.matrix.device.type, moved.factor.device.type) == ("meta", "meta")
        for each in (agg, folded):
            each.accumulate(Tokens(keys, pkeys, pgrads, eta))
        folded.fold()
        assert (agg.A is None) == (2 * n <= a)  # the tokens kept (dual) only below half the key size
        solutions = agg.solve(lam), folded.solve(lam)
        assert [type(x).__name__ for x in solutions] == ["DualSolution" if 2 * n <= a else "NormalSolution", "NormalSolution"]
        for solution in solutions:
            assert_like_autograd(solution, S, G, lam_r, keys, pkeys, pgrads, eta, pk, pg, atol=1e-5)


def test_the_identity_as_prior_is_the_papers_solve_and_priors_reach_each_module():
    keys, pkeys, pgrads, _ = random_problem(n=9, a=6, b=2, seed=8)
    eta = torch.tensor(0.4, dtype=torch.float64)
    shapes = {"a": (6, 2), "b": (6, 2)}
    plain = AGGREGATIONS["malmen"](shapes)
    shaped = AGGREGATIONS["malmen"](shapes, priors={"a": torch.eye(6), "b": 2 * torch.eye(6)})
    for agg in (plain, shaped):
        agg.accumulate({m: Tokens(keys, pkeys, pgrads, eta) for m in shapes})
    ours, paper = shaped.solve({"a": 0.5, "b": 0.5}).shifts, plain.solve({"a": 0.5, "b": 1.0}).shifts
    assert torch.allclose(ours["a"], paper["a"], atol=1e-6)  # lambda I
    assert torch.allclose(ours["b"], paper["b"], atol=1e-6)  # lambda (2 I) = (2 lambda) I


def test_the_solver_folds_into_sums_past_half_the_key_size_and_for_statistics():
    keys, pkeys, pgrads, _ = random_problem(n=12, a=6, b=2, seed=5)
    eta = torch.tensor(0.5, dtype=torch.float64)
    agg = NormalEquation(6, 2)
    agg.accumulate(Tokens(keys[:3], pkeys[:3], pgrads[:3], eta))
    assert agg.A is None  # 3 tokens, 6 key dimensions: still the tokens
    agg.accumulate(Tokens(keys[3:], pkeys[3:], pgrads[3:], eta))
    assert agg.A is not None and agg.keys == []
    assert torch.allclose(agg.A, keys.t() @ keys) and agg.tokens == 12
    few = NormalEquation(6, 2)
    few.accumulate(Tokens(keys[:3], pkeys[:3], pgrads[:3], eta))
    stats = few.statistics()  # sums asked for (to add over processes, to save): folded
    assert torch.allclose(stats["A"], keys[:3].t() @ keys[:3])


def test_the_sum_aggregation_refuses_a_regulariser_shape():
    with pytest.raises(ValueError, match="no regulariser"):
        AGGREGATIONS["sum"]({"m": (4, 2)}, priors={"m": torch.eye(4)})


def test_sum_aggregation_backward_matches_autograd():
    keys, pkeys, pgrads, G = random_problem(seed=1)
    eta = torch.tensor(0.5, dtype=torch.float64)
    pk, pg = pkeys.clone().requires_grad_(), pgrads.clone().requires_grad_()
    S = -eta * pk.t() @ pg
    (S * G).sum().backward()
    agg = SumAggregation(keys.shape[1], pgrads.shape[1])
    agg.accumulate(Tokens(keys, pkeys.float(), pgrads.float(), eta.float()))
    solution = agg.solve()
    assert torch.allclose(solution.shift.double(), S.detach(), atol=1e-5)
    adjoint = solution.backward(G)
    pk2, pg2 = pkeys.float().requires_grad_(), pgrads.float().requires_grad_()
    adjoint.surrogate(Tokens(keys, pk2, pg2, eta.float())).backward()
    assert torch.allclose(pk2.grad.double(), pk.grad, atol=1e-5)
    assert torch.allclose(pg2.grad.double(), pg.grad, atol=1e-5)


def test_streaming_sums_equal_dense_solve():
    keys, pkeys, pgrads, _ = random_problem(n=50, a=8, b=4, seed=2)
    keys, pkeys, pgrads = keys.float(), pkeys.float(), pgrads.float()
    eta, lam = torch.tensor(0.2), 0.1
    streamed = NormalEquation(8, 4)
    for s in range(0, 50, 7):
        streamed.accumulate(Tokens(keys[s:s + 7], pkeys[s:s + 7], pgrads[s:s + 7], eta))
    K, D = keys.double(), value_differences(keys, pkeys, pgrads, eta).double()
    dense = torch.linalg.solve(K.t() @ K + lam * torch.eye(8, dtype=torch.float64), K.t() @ D)
    assert torch.allclose(streamed.solve(lam).shift.double(), dense, atol=1e-5)
    assert streamed.tokens == 50


def test_fewer_tokens_than_key_size_and_identical_keys_stay_finite():
    agg = NormalEquation(16, 4)
    k = torch.ones(3, 16)  # identical keys, n < a
    agg.accumulate(Tokens(k, torch.randn(3, 16), torch.randn(3, 4), torch.tensor(1.0)))
    S = agg.solve(1e-3).shift
    assert torch.isfinite(S).all()
    # the solve fits the (averaged) target on the shared key
    assert S.abs().sum() > 0


def test_cholesky_jitter_warns_on_singular_matrix():
    m = torch.zeros(4, 4, dtype=torch.float64)
    m[0, 0] = 1.0
    with pytest.warns(RuntimeWarning, match="ill-conditioned"):
        factor = cholesky(m)
    assert torch.isfinite(factor).all()


@pytest.mark.parametrize("shaped", [False, True])
def test_joint_solve_and_its_backward_match_autograd(shaped):
    """Two modules of key sizes 5 and 4, one output size: the joint solve equals the dense stacked
    least squares, and its backward (lambdas, pseudo keys and gradients, steps) equals autograd;
    ``shaped``: the first module's regulariser is lambda P (the second keeps lambda I)."""
    g = torch.Generator().manual_seed(3)
    n, sizes, b = 9, {"m1": 5, "m2": 4}, 3
    keys = {m: torch.randn(n, a, generator=g, dtype=torch.float64) for m, a in sizes.items()}
    pkeys = {m: torch.randn(n, a, generator=g, dtype=torch.float64) for m, a in sizes.items()}
    pgrads = {m: torch.randn(n, b, generator=g, dtype=torch.float64) for m in sizes}
    G = {m: torch.randn(a, b, generator=g, dtype=torch.float64) for m, a in sizes.items()}
    etas = {"m1": torch.tensor(0.3, dtype=torch.float64), "m2": torch.tensor(0.8, dtype=torch.float64)}
    lams = {"m1": torch.tensor(0.7, dtype=torch.float64), "m2": torch.tensor(0.2, dtype=torch.float64)}

    leaf = {k: {m: t.clone().requires_grad_() for m, t in d.items()} for k, d in
            (("pk", pkeys), ("pg", pgrads), ("eta", etas), ("lam", lams))}
    K = torch.cat([keys[m] for m in sizes], -1)
    D = sum(value_differences(keys[m], leaf["pk"][m], leaf["pg"][m], leaf["eta"][m]) for m in sizes)
    root = torch.randn(5, 5, generator=g, dtype=torch.float64)
    shapes = {"m1": root @ root.t() / 5 + 0.1 * torch.eye(5, dtype=torch.float64) if shaped
              else torch.eye(5, dtype=torch.float64), "m2": torch.eye(4, dtype=torch.float64)}
    reg = torch.block_diag(*[leaf["lam"][m] * shapes[m] for m in sizes])
    S = torch.linalg.solve(K.t() @ K + reg, K.t() @ D)
    (S * torch.cat([G[m] for m in sizes])).sum().backward()

    agg = JointNormalEquation({m: (a, b) for m, a in sizes.items()}, priors={"m1": shapes["m1"]} if shaped else None)
    for s in (slice(0, 4), slice(4, 9)):  # streamed in two chunks
        agg.accumulate({m: Tokens(keys[m][s], pkeys[m][s], pgrads[m][s], etas[m]) for m in sizes})
    solution = agg.solve(lams)
    assert torch.allclose(torch.cat([solution.shifts[m] for m in sizes]).double(), S.detach(), atol=1e-5)
    adjoint = solution.backward(G)
    for m in sizes:
        assert torch.allclose(adjoint.dlam[m].double(), leaf["lam"][m].grad, rtol=1e-4), m
    mine = {k: {m: t.clone().float().requires_grad_() for m, t in d.items()} for k, d in
            (("pk", pkeys), ("pg", pgrads), ("eta", etas))}
    adjoint.surrogate({m: Tokens(keys[m], mine["pk"][m], mine["pg"][m], mine["eta"][m]) for m in sizes}).backward()
    for k in ("pk", "pg", "eta"):
        for m in sizes:
            assert torch.allclose(mine[k][m].grad.double(), leaf[k][m].grad, rtol=1e-4, atol=1e-6), (k, m)


def test_joint_solve_refuses_modules_of_other_output_sizes_or_tokens():
    with pytest.raises(ValueError, match="one output size"):
        JointNormalEquation({"a": (4, 3), "b": (4, 5)})
    agg = AGGREGATIONS["joint"]({"a": (4, 3), "b": (2, 3)})
    t = lambda n, a: Tokens(torch.randn(n, a), torch.randn(n, a), torch.randn(n, 3), torch.tensor(1.0))
    with pytest.raises(ValueError, match="same tokens"):
        agg.accumulate({"a": t(5, 4), "b": t(4, 2)})


def test_joint_solve_fits_more_keys_than_one_module_has_dimensions():
    """The point of the joint solve: 12 keys with independent targets fit exactly in two 8-dim
    modules together (16 dimensions), not in one of them alone."""
    g = torch.Generator().manual_seed(0)
    n, a, b = 12, 8, 2
    keys = {m: torch.randn(n, a, generator=g) for m in ("m1", "m2")}
    target = torch.randn(n, b, generator=g)
    # d_j as value_differences gives it: -eta (k~ . k) g~ with k~ = k / |k|^2 and g~ = -target (split over modules)
    tokens = {m: Tokens(keys[m], keys[m] / keys[m].pow(2).sum(-1, keepdim=True), -target / 2, torch.tensor(1.0))
              for m in keys}
    joint = AGGREGATIONS["joint"]({m: (a, b) for m in keys})
    joint.accumulate(tokens)
    shifts = joint.solve({m: torch.tensor(1e-6) for m in keys}).shifts
    fitted = sum(keys[m] @ shifts[m] for m in keys)
    assert torch.allclose(fitted, target, atol=1e-3)
    alone = NormalEquation(a, b)
    alone.accumulate(Tokens(keys["m1"], tokens["m1"].pkeys, -target, torch.tensor(1.0)))
    assert (keys["m1"] @ alone.solve(1e-6).shift - target).abs().max() > 0.1


def direct_r2(K: torch.Tensor, S: torch.Tensor, D: torch.Tensor) -> float:
    return float(1.0 - (K @ S - D).square().sum() / D.square().sum())


@pytest.mark.parametrize("n, a, shaped", [(4, 12, False), (4, 12, True), (30, 8, False), (30, 8, True)])
def test_fit_and_room_equal_their_direct_definitions(n, a, shaped):
    """R^2 = 1 - |K S - D|^2 / |D|^2 and the mean leverage tr(K (K^T K + lambda P)^-1 K^T) / N,
    computed directly against the solver's fit and room, in the dual form (4 tokens, 12
    dimensions), the primal sums (30 tokens in 8 dimensions, streamed in two chunks) and with a
    shaped regulariser (where A S = B - lambda P S gives the residual without A)."""
    keys, pkeys, pgrads, _ = random_problem(n=n, a=a, b=3, seed=5)
    eta, lam = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    root = torch.randn(a, a, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    prior = root @ root.t() / a + 0.1 * torch.eye(a, dtype=torch.float64) if shaped else None
    agg = NormalEquation(a, 3, prior=prior)
    for s in (slice(0, n // 2), slice(n // 2, n)):
        agg.accumulate(Tokens(keys[s], pkeys[s], pgrads[s], eta))
    solution = agg.solve(lam)
    D = value_differences(keys, pkeys, pgrads, eta)
    reg = lam * (prior if shaped else torch.eye(a, dtype=torch.float64))
    leverage = torch.trace(keys @ torch.linalg.solve(keys.t() @ keys + reg, keys.t())) / n  # tr(H) / N
    assert agg.fit(solution) == pytest.approx(direct_r2(keys, solution.shift64, D), abs=1e-6)  # d is fp32 in the solver
    assert agg.room(solution) == pytest.approx(float(leverage), abs=1e-9)
    agg.statistics()  # folding the tokens into the sums does not change the answer
    assert agg.fit(solution) == pytest.approx(direct_r2(keys, solution.shift64, D), abs=1e-6)  # d is fp32 in the solver


def test_fit_is_one_where_the_keys_have_room_and_below_one_where_they_do_not():
    """Independent targets: 6 keys in 8 dimensions are written exactly (R^2 about 1 at a tiny
    lambda, every leverage 1), 40 keys are not (a least-squares compromise; mean leverage 8 / 40);
    the joint solve fits its summed target over both modules; MEND's sum reports nothing."""
    g = torch.Generator().manual_seed(2)
    a, b = 8, 2

    def tokens(n, m=1):
        keys = torch.randn(n, a, generator=g)
        target = torch.randn(n, b, generator=g)
        return Tokens(keys, keys / keys.pow(2).sum(-1, keepdim=True), -target / m, torch.tensor(1.0))

    for n, fits in ((6, True), (40, False)):
        agg = AGGREGATIONS["malmen"]({"m": (a, b)})
        agg.accumulate({"m": tokens(n)})
        solution = agg.solve({"m": torch.tensor(1e-4)})  # small against the keys' eigenvalues, above fp32's noise
        r2, room = agg.fit(solution)["m"], agg.room(solution)["m"]
        assert (r2 > 1 - 1e-4) if fits else (0.0 < r2 < 0.9), (n, r2)
        assert room == pytest.approx(min(n, a) / n, rel=1e-3), (n, room)  # tr(H) = rank K as lambda -> 0
    joint = AGGREGATIONS["joint"]({"m1": (a, b), "m2": (a, b)})
    chunk = {"m1": tokens(12, 2), "m2": tokens(12, 2)}
    joint.accumulate(chunk)
    solution = joint.solve({"m1": torch.tensor(0.3), "m2": torch.tensor(0.1)})
    K = torch.cat([chunk[m].keys for m in ("m1", "m2")], -1).double()
    D = sum(chunk[m].differences() for m in ("m1", "m2")).double()
    assert joint.fit(solution)["joint"] == pytest.approx(direct_r2(K, solution.shift64, D), abs=1e-6)
    assert joint.room(solution) == {"joint": None}
    assert report(joint, solution) == {"fit": joint.fit(solution)}
    mend = AGGREGATIONS["sum"]({"m": (a, b)})
    mend.accumulate({"m": tokens(3)})
    assert mend.fit(mend.solve({"m": None})) == mend.room(mend.solve({"m": None})) == {"m": None}
    assert report(mend, mend.solve({"m": None})) == {}


def test_solved_trace_equals_the_trace_of_the_dense_inverse_in_any_block_size():
    from malmen.solver import solved_trace

    g = torch.Generator().manual_seed(6)
    root, other = (torch.randn(10, 10, generator=g, dtype=torch.float64) for _ in range(2))
    M, P = root @ root.t() + torch.eye(10, dtype=torch.float64), other @ other.t()
    factor = torch.linalg.cholesky(M)
    for block in (1, 3, 10, 64):
        assert float(solved_trace(factor, block=block)) == pytest.approx(float(torch.linalg.inv(M).trace()), rel=1e-10)
        assert float(solved_trace(factor, P, block=block)) == pytest.approx(float(torch.linalg.solve(M, P).trace()), rel=1e-10)
