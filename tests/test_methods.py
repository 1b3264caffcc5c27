"""methods.py: every registered method honours the one editor interface: it edits, the edit
reverts bit for bit, it leaves no gradients, and a method with state saves and reloads to the
same shifts."""
import dataclasses

import pytest
import torch

import tiny
from malmen.editor import EditHandle, EditorConfig, MalmenEditor
from malmen.hypernet import HyperConfig
from malmen.methods import METHODS, prepare

OPTIONS = {"ft_steps": 3, "memit_layers": "1-2", "memit_steps": 5, "stats_texts": 8, "memit_lambda": 1.0,
           "null_threshold": 1e9}  # the tiny model's key statistics: every direction counts as null


def facts():
    return [dataclasses.replace(f, subject=f.prompt.split()[-1]) for f in tiny.facts(5, seed=8)]


@pytest.fixture(scope="module")
def trained_editors(tmp_path_factory):
    """An (untrained, perturbed) editor per hyper-network aggregation, saved like a trained one."""
    root = tmp_path_factory.mktemp("editors")
    paths = {}
    for aggregation in ("malmen", "sum"):
        torch.manual_seed(2)
        ed = MalmenEditor(tiny.llama(init=0.3), tiny.tokenizer(),
                          EditorConfig(aggregation=aggregation, lm_batch_size=4, hyper=HyperConfig(rank=8, eta_init=1.0)))
        with torch.no_grad():
            for p in ed.hypernet.network_parameters():
                p.add_(0.05 * torch.randn_like(p))
        ed.save_pretrained(root / aggregation)
        paths[aggregation] = root / aggregation
    return paths


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_edits_reverts_and_reloads(name, trained_editors, tmp_path):
    method = METHODS[name]
    model = tiny.llama(init=0.3)
    model.requires_grad_(True)  # as a plain from_pretrained model comes
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor_dir = None
    if method.trained:
        editor_dir = str(trained_editors["sum" if name == "mend" else "malmen"])
    options = dict(OPTIONS, stats_dir=str(tmp_path))
    editor = method.build(model, tiny.tokenizer(), editor_dir, options)
    assert prepare(editor) >= 0.0
    handle = editor.edit(facts())
    assert isinstance(handle, EditHandle)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, base[n])]
    assert changed and set(changed) <= {f"{m}.weight" for m in editor.modules}
    assert all(p.grad is None for p in model.parameters()) and all(p.requires_grad for p in model.parameters())
    shifts = {m: handle.shifts[m].clone() for m in editor.modules}
    handle.revert()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    if hasattr(editor, "save_pretrained"):
        editor.save_pretrained(tmp_path / "saved")
        again = type(editor).from_pretrained(tmp_path / "saved", model, tiny.tokenizer())
        reloaded = again.shifts(facts())
        assert all(torch.allclose(reloaded[m], shifts[m], atol=1e-6 * float(shifts[m].abs().max())) for m in shifts)


def test_lambda_scale_equals_a_learned_lambda_that_large(trained_editors):
    """--lambda-scale s solves with s times the learned regularisers: the same shifts as the editor
    whose log-lambdas are log(s) higher, and a shift that shrinks as s grows."""
    torch.manual_seed(0)
    model, tok = tiny.llama(init=0.3), tiny.tokenizer()
    scaled = METHODS["malmen"].build(model, tok, str(trained_editors["malmen"]), {"lambda_scale": 50.0})
    assert scaled.config.lambda_scale == 50.0
    reference = MalmenEditor.from_pretrained(trained_editors["malmen"], model, tok)
    with torch.no_grad():
        reference.hypernet.log_lambda.add_(torch.log(torch.tensor(50.0)))
    plain = MalmenEditor.from_pretrained(trained_editors["malmen"], model, tok)
    a, b, c = scaled.shifts(facts()), reference.shifts(facts()), plain.shifts(facts())
    for m in a:
        torch.testing.assert_close(a[m], b[m], rtol=1e-4, atol=1e-7)
        assert a[m].norm() < c[m].norm()
    with pytest.raises(ValueError, match="lambda_scale must be positive"):
        METHODS["malmen"].build(model, tok, str(trained_editors["malmen"]), {"lambda_scale": 0.0})
