import pytest
import torch

import tiny
from malmen.editor import EditorConfig, MalmenEditor
from malmen.hypernet import HyperConfig, Normaliser
from malmen.patches import make_patch
from malmen.solver import NormalEquation, Tokens, value_differences
from malmen.weights import gradient_weights, weighted_keys


def normaliser(a, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = Normaliser(a + b)
    norm.mean.copy_(torch.randn(a + b, generator=g))
    norm.var.copy_(torch.rand(a + b, generator=g) + 0.5)
    return norm


@pytest.mark.parametrize("n", [3, 40])  # the dual form (fewer tokens than half the key size) and the primal
def test_weighted_keys_solve_the_weighted_least_squares(n):
    """sum_j w_j |S^T k_j - d_j|^2 + lambda |S|^2 with d_j the unweighted value differences:
    S* = (K^T W K + lambda I)^-1 K^T W D."""
    a, b, lam = 12, 5, 0.7
    g = torch.Generator().manual_seed(n)
    keys, pkeys = torch.randn(n, a, generator=g), torch.randn(n, a, generator=g)
    pgrads, grads = torch.randn(n, b, generator=g), torch.randn(n, b, generator=g)
    eta = torch.tensor(0.3)
    norm = normaliser(a, b)
    agg = NormalEquation(a, b)
    agg.accumulate(Tokens(weighted_keys(keys, grads, norm, "gradient"), pkeys, pgrads, eta))
    shift = agg.solve(torch.tensor(lam)).shift

    K, D = keys.double(), value_differences(keys, pkeys, pgrads, eta).double()
    W = torch.diag(gradient_weights(grads, norm).double())
    expected = torch.linalg.solve(K.t() @ W @ K + lam * torch.eye(a, dtype=torch.float64), K.t() @ W @ D)
    assert torch.allclose(shift.double(), expected, atol=1e-5)


def test_gradient_weights_are_the_gradient_norm_against_the_typical_one():
    a, b = 4, 3
    norm = Normaliser(a + b)
    norm.mean[a:] = torch.tensor([1.0, 0.0, 0.0])
    norm.var[a:] = torch.tensor([1.0, 2.0, 4.0])          # E|g|^2 = (1 + 1) + 2 + 4 = 8
    grads = torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, 4.0]])
    assert torch.allclose(gradient_weights(grads, norm), torch.tensor([0.0, 1.0, 2.0]))
    keys = torch.randn(3, a)
    assert weighted_keys(keys, grads, norm, "uniform") is keys
    assert torch.allclose(weighted_keys(keys, grads, norm, "gradient")[1], keys[1])
    with pytest.raises(ValueError, match="token weights"):
        weighted_keys(keys, grads, norm, "loss")


def test_an_editor_with_gradient_weights_edits_saves_them_and_refuses_patches(tmp_path):
    model, tok = tiny.llama(), tiny.tokenizer()
    torch.manual_seed(0)
    editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8, eta_init=1.0), lm_batch_size=3))
    facts = tiny.facts(7)
    uniform = editor.shifts(facts)
    editor.config.token_weights = "gradient"
    weighted = editor.shifts(facts)
    assert all(torch.isfinite(s).all() for s in weighted.values())
    assert not any(torch.allclose(uniform[m], weighted[m]) for m in uniform)
    editor.save_pretrained(tmp_path / "ed")
    loaded = MalmenEditor.from_pretrained(tmp_path / "ed", model, tok)
    assert loaded.config.token_weights == "gradient"
    assert all(torch.equal(loaded.shifts(facts)[m], weighted[m]) for m in weighted)
    with pytest.raises(ValueError, match="uniform token weights"):
        make_patch(editor, facts)
    with pytest.raises(ValueError, match="token_weights"):
        MalmenEditor(model, tok, EditorConfig(token_weights="loss"))
