import math

import pytest
import torch

import tiny
from malmen.editor import EditorConfig, EditHandle, MalmenEditor, finetune_loss, trace
from malmen.evaluate import evaluate
from malmen.hypernet import HyperConfig
from malmen.solver import value_differences
from malmen.train import TrainConfig, Trainer, _per_fact_mean


def reference_meta_loss(trainer, facts, step):
    """L_meta by plain autograd through hyper-network, solve and LM (no separation)."""
    ed, hn = trainer.editor, trainer.editor.hypernet
    adapter, model = ed.adapter, ed.adapter.model
    batch = adapter.batch([f.prompt for f in facts], [f.target for f in facts])
    keys, grads = trace(adapter, ed.modules, batch)
    shifts = {}
    for name in ed.modules:
        k, g = keys[name], grads[name]
        pk, pg = hn(name, k, g)
        d = value_differences(k, pk, pg, hn.eta(name))
        A = k.t() @ k + hn.lam(name) * torch.eye(k.shape[1])
        shifts[name] = torch.linalg.solve(A, k.t() @ d)
    params = dict(model.named_parameters())
    for name, S in shifts.items():
        params[f"{name}.weight"] = params[f"{name}.weight"] + S.t()
    gen = adapter.batch([trainer.rephrase(f, step) for f in facts], [f.target for f in facts])
    loc = adapter.batch([f.locality_prompt for f in facts], [f.locality_answer for f in facts])
    with torch.no_grad():
        before = torch.log_softmax(adapter.answer_logits(loc), -1)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}

    def logits(b):
        return torch.func.functional_call(model, params, (), {"input_ids": b.input_ids, "attention_mask": b.attention_mask}).logits[b.mask]

    n = len(facts)
    l_gen = finetune_loss(logits(gen), gen) / n
    kl = (before.exp() * (before - torch.log_softmax(logits(loc), -1))).sum(-1)
    l_loc = _per_fact_mean(kl, loc.mask) / n
    for name, p in model.named_parameters():
        assert torch.equal(p, original[name])
    return l_gen + trainer.config.c_loc * l_loc


@pytest.mark.parametrize("aggregation", ["malmen"])
def test_separated_backprop_matches_autograd(aggregation):
    torch.manual_seed(0)
    model, tok = tiny.llama(layers=3), tiny.tokenizer()
    ed = MalmenEditor(model, tok, EditorConfig(modules=[], aggregation=aggregation, hyper=HyperConfig(rank=8),
                                               lm_batch_size=3, hyper_batch_size=5))
    facts = tiny.facts(8, seed=3)
    trainer = Trainer(ed, facts, facts, TrainConfig(n_edits=8, c_loc=0.7, calibrate_eta=False), "/tmp/unused")
    hn = ed.hypernet
    with torch.no_grad():  # move away from the identity so that every parameter matters
        hn.log_eta.fill_(math.log(3.0))
        hn.log_lambda.fill_(-2.0)
        for p in hn.network_parameters():
            p.add_(0.05 * torch.randn_like(p))
    # meta_gradients updates the normaliser first and then uses it; the reference uses that state
    trainer.meta_gradients(facts, 0)
    ours = {n: p.grad.clone() for n, p in hn.named_parameters()}
    hn.zero_grad()
    loss = reference_meta_loss(trainer, facts, 0)
    loss.backward()
    for name, p in hn.named_parameters():
        assert torch.allclose(ours[name], p.grad, rtol=2e-3, atol=1e-6), name
