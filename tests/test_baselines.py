import torch

import tiny
from malmen.baselines import FineTuneConfig, FineTuneEditor
from malmen.editor import finetune_loss


def edit_loss(editor, facts):
    batch = editor.adapter.batch([f.prompt for f in facts], [f.target for f in facts])
    with torch.no_grad():
        return float(finetune_loss(editor.adapter.answer_logits(batch), batch))


def test_ft_lowers_edit_loss_and_reverts_exactly():
    model, tok = tiny.llama(init=0.3), tiny.tokenizer()
    editor = FineTuneEditor(model, tok, FineTuneConfig(steps=15, lr=1e-2, lm_batch_size=4))
    facts = tiny.facts(6)
    before_w = {n: p.clone() for n, p in model.named_parameters()}
    before = edit_loss(editor, facts)
    handle = editor.edit(facts)
    assert edit_loss(editor, facts) < 0.5 * before
    handle.revert()
    assert all(torch.equal(p, before_w[n]) for n, p in model.named_parameters())


def test_ft_l_bounds_the_weight_change():
    model, tok = tiny.llama(init=0.3), tiny.tokenizer()
    editor = FineTuneEditor(model, tok, FineTuneConfig(steps=10, lr=1e-1, linf=1e-3))
    shifts = editor.shifts(tiny.facts(4))
    assert all(s.abs().max() <= 1e-3 + 1e-9 for s in shifts.values())
    assert any(s.abs().max() > 5e-4 for s in shifts.values())


def test_ft_trunk_replay_gives_the_same_shifts():
    """Replaying the blocks below the edited layers across Adam steps changes nothing but the time."""
    model, tok = tiny.llama(layers=4, init=0.3), tiny.tokenizer()
    modules = ["model.layers.2.mlp.down_proj", "model.layers.3.mlp.down_proj"]
    facts = tiny.facts(6)
    runs, calls = {}, []
    counter = model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    for replay in (False, True):
        calls.clear()
        config = FineTuneConfig(modules=list(modules), steps=5, lr=1e-2, lm_batch_size=4, replay_trunk=replay)
        runs[replay] = FineTuneEditor(model, tok, config).shifts(facts)
        assert len(calls) == (2 if replay else 10)   # 6 facts in 2 micro-batches, 5 steps
    counter.remove()
    assert FineTuneEditor(model, tok, FineTuneConfig(modules=list(modules))).adapter.lowest_block(modules) == 2
    for name in modules:
        assert runs[True][name].abs().max() > 0
        torch.testing.assert_close(runs[True][name], runs[False][name], rtol=1e-5, atol=1e-7)
