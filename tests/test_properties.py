"""Property-based tests (hypothesis) for the loaders and the solver."""
import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from malmen.datasets import load_facts
from malmen.facts import Fact, FactError
from malmen.solver import NormalEquation, Tokens, value_differences

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
field_names = st.sampled_from(["prompt", "target", "rephrases", "locality_prompt", "locality_answer",
                               "subject", "true_answer", "id", "src", "alt", "answers", "other"])
records = st.dictionaries(field_names, json_values | st.text(min_size=0, max_size=6), max_size=7)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(records | json_values, min_size=0, max_size=4), target=st.sampled_from(["new", "true"]))
def test_loader_yields_facts_or_a_fact_error(tmp_path, rows, target):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        facts = list(load_facts(path, target=target, check_conflicts=True))
    except FactError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        return
    assert facts and all(isinstance(f, Fact) and f.prompt and f.target for f in facts)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 20), a=st.integers(1, 8), b=st.integers(1, 5), chunk=st.integers(1, 7),
       lam=st.floats(1e-3, 10.0), seed=st.integers(0, 2**16))
def test_streaming_solve_equals_dense_and_is_finite(n, a, b, chunk, lam, seed):
    g = torch.Generator().manual_seed(seed)
    keys, pkeys, pgrads = torch.randn(n, a, generator=g), torch.randn(n, a, generator=g), torch.randn(n, b, generator=g)
    eta = torch.tensor(0.5)
    agg = NormalEquation(a, b)
    for s in range(0, n, chunk):
        agg.accumulate(Tokens(keys[s:s + chunk], pkeys[s:s + chunk], pgrads[s:s + chunk], eta))
    S = agg.solve(lam).shift
    K, D = keys.double(), value_differences(keys, pkeys, pgrads, eta).double()
    dense = torch.linalg.solve(K.t() @ K + lam * torch.eye(a, dtype=torch.float64), K.t() @ D)
    assert torch.isfinite(S).all()
    # the chunk products are fp32 (the sums fp64): their rounding, about 1e-7 relative, is
    # amplified by the condition number of K^T K + lambda I (large when n < a and lambda is small)
    cond = torch.linalg.cond(K.t() @ K + lam * torch.eye(a, dtype=torch.float64))
    assert torch.allclose(S.double(), dense, rtol=1e-3, atol=1e-4 + float(cond) * 1e-7 * float(dense.abs().max()))
