import torch

import tiny
from malmen.editor import finetune_loss
from malmen.adapters import CausalLMAdapter
from malmen.tracing import KeyGradTrace


def test_keys_and_grads_match_autograd_and_no_weight_grads():
    model, tok = tiny.llama(layers=4), tiny.tokenizer()
    adapter = CausalLMAdapter(model, tok)
    names = adapter.default_modules(n_last=2)
    facts = tiny.facts(4)
    batch = adapter.batch([f.prompt for f in facts], [f.target for f in facts])

    # reference: retain module inputs/outputs with ordinary hooks and full autograd
    seen = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)) or o.retain_grad()) for n in names]
    for p in model.parameters():
        p.requires_grad_(True)
    finetune_loss(adapter.answer_logits(batch), batch).backward()
    for h in handles:
        h.remove()
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None

    lower = adapter.default_modules(n_last=4)[0]  # below the traced layers
    lower_grads = []
    h = model.get_submodule(lower).register_full_backward_hook(lambda *a: lower_grads.append(1))
    with KeyGradTrace(model, names, batch.mask) as t:
        finetune_loss(adapter.answer_logits(batch), batch).backward()
    h.remove()
    for n in names:
        inp, out = seen[n]
        assert torch.allclose(t.keys[n], inp[batch.mask].detach())
        assert torch.allclose(t.grads[n], out.grad[batch.mask], atol=1e-6)
        assert t.keys[n].shape == (int(batch.mask.sum()), model.get_submodule(n).in_features)
    assert all(p.grad is None for p in model.parameters()), "no weight gradient may be computed"
    assert lower_grads == [], "backprop must stop at the lowest traced layer"


def test_hooks_are_removed():
    model, tok = tiny.llama(), tiny.tokenizer()
    adapter = CausalLMAdapter(model, tok)
    names = adapter.default_modules()
    with KeyGradTrace(model, names, None):
        pass
    assert all(not model.get_submodule(n)._forward_hooks for n in names)
