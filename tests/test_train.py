import math

import pytest
import torch

import tiny
from malmen.editor import EditorConfig, MalmenEditor, trace
from malmen.evaluate import evaluate
from malmen.hypernet import HyperConfig
from malmen.solver import value_differences
from malmen.train import TrainConfig, Trainer


def reference_meta_loss(trainer, facts, step):
    """L_meta by plain autograd through hyper-network, solve and LM (no separation)."""
    ed, hn = trainer.editor, trainer.editor.hypernet
    adapter, model = ed.adapter, ed.adapter.model
    batch = adapter.batch([f.prompt for f in facts], [f.target for f in facts])
    keys, grads = trace(adapter, ed.modules, batch)
    shifts = {}
    outs = {name: hn(name, keys[name], grads[name]) for name in ed.modules}
    diffs = {name: value_differences(keys[name], *outs[name], hn.eta(name)) for name in ed.modules}
    for name in ed.modules:
        k, (pk, pg) = keys[name], outs[name]
        if ed.config.aggregation == "sum":
            shifts[name] = -hn.eta(name) * pk.t() @ pg
        elif ed.config.aggregation == "malmen":
            A = k.t() @ k + hn.lam(name, k.shape[0]) * torch.eye(k.shape[1])  # lambda at N = this solve's keys
            shifts[name] = torch.linalg.solve(A, k.t() @ diffs[name])
    if ed.config.aggregation == "joint":  # one solve over the concatenated keys, the summed differences
        K = torch.cat([keys[name] for name in ed.modules], -1)
        reg = torch.diag(torch.cat([hn.lam(name, K.shape[0]) * torch.ones(keys[name].shape[1]) for name in ed.modules]))
        S = torch.linalg.solve(K.t() @ K + reg, K.t() @ sum(diffs.values()))
        shifts = dict(zip(ed.modules, S.split([keys[name].shape[1] for name in ed.modules])))
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

    def answer_loss(b):  # each fact's mean cross-entropy, its first answer token weighed first_token_weight
        ce, total, i = torch.nn.functional.cross_entropy(logits(b), b.targets[b.mask], reduction="none"), 0.0, 0
        for count in b.mask.sum(1).tolist():
            w = torch.ones(count)
            w[0] = trainer.config.first_token_weight
            total, i = total + (ce[i:i + count] * w).sum() / w.sum(), i + count
        return total

    n = len(facts)
    l_gen = answer_loss(gen) / n
    if trainer.config.c_edit:  # the edit prompts' own loss, with the same shifts applied
        edit = adapter.batch([f.prompt for f in facts], [f.target for f in facts])
        l_gen = l_gen + trainer.config.c_edit * answer_loss(edit) / n
    kl = (before.exp() * (before - torch.log_softmax(logits(loc), -1))).sum(-1)
    l_loc = loc.per_fact_sum(kl) / n
    for name, p in model.named_parameters():
        assert torch.equal(p, original[name])
    return l_gen + trainer.config.c_loc * l_loc


@pytest.mark.parametrize("aggregation, c_edit, first", [("malmen", 0.0, 1.0), ("sum", 0.0, 1.0), ("joint", 0.0, 1.0),
                                                        ("malmen", 0.6, 1.0), ("malmen", 0.6, 3.0)])
def test_separated_backprop_matches_autograd(aggregation, c_edit, first):
    torch.manual_seed(0)
    model, tok = tiny.llama(layers=3), tiny.tokenizer()
    ed = MalmenEditor(model, tok, EditorConfig(modules=[], aggregation=aggregation, hyper=HyperConfig(rank=8),
                                               lm_batch_size=3, hyper_batch_size=5))
    facts = tiny.facts(8, seed=3)
    trainer = Trainer(ed, facts, facts, TrainConfig(n_edits=8, c_loc=0.7, c_edit=c_edit, first_token_weight=first,
                                                                calibrate_eta=False), "/tmp/unused")
    hn = ed.hypernet
    with torch.no_grad():  # move away from the identity so that every parameter matters
        hn.log_eta.fill_(math.log(3.0))
        hn.log_lambda.fill_(-2.0)
        hn.lambda_exponent.copy_(torch.linspace(-0.5, 0.5, len(ed.modules)))  # lambda(N) = lambda (N / N0)^alpha
        for p in hn.network_parameters():
            p.add_(0.05 * torch.randn_like(p))
    # meta_gradients updates the normaliser first and then uses it; the reference uses that state
    trainer.meta_gradients(facts, 0)
    ours = {n: p.grad.clone() for n, p in hn.named_parameters()}
    hn.zero_grad()
    loss = reference_meta_loss(trainer, facts, 0)
    loss.backward()
    for name, p in hn.named_parameters():
        reference = p.grad if p.grad is not None else torch.zeros_like(p)  # lambda (and alpha) unused by 'sum'
        assert torch.allclose(ours[name], reference, rtol=2e-3, atol=1e-6), name
        assert ours[name].abs().sum() > 0 or reference.abs().sum() == 0


def heldout_meta_loss(trainer, facts):
    """L_meta on held-out facts without touching the normaliser or the gradients."""
    hn = trainer.editor.hypernet
    state = {k: v.clone() for k, v in hn.state_dict().items()}
    stats = trainer.meta_gradients(facts, step=1)
    hn.load_state_dict(state)
    hn.zero_grad(set_to_none=True)
    return stats["gen_loss"] + trainer.config.c_loc * stats["loc_loss"]


def order_trainer(n_edits, facts=50):
    editor = MalmenEditor(tiny.llama(layers=2), tiny.tokenizer(), EditorConfig(hyper=HyperConfig(rank=4)))
    return Trainer(editor, tiny.facts(facts, seed=1), [], TrainConfig(n_edits=n_edits, seed=3), "/tmp/unused")


def test_one_n_takes_the_next_n_facts_of_each_epochs_shuffle():
    """The order of runs started before mixes existed: a resumed run must see the same facts."""
    import random

    trainer = order_trainer(8)
    for step in range(14):  # 6 steps per epoch of 50 facts: the last 2 of each shuffle wait
        epoch, pos = divmod(step, 50 // 8)
        order = list(range(50))
        random.Random(f"3:{epoch}").shuffle(order)
        assert trainer.step_facts(step) == [trainer.train[i] for i in order[pos * 8:(pos + 1) * 8]]


def test_a_mix_of_n_cycles_through_its_sizes_without_repeats_in_an_epoch():
    trainer = order_trainer([4, 12])
    steps = [trainer.step_facts(step) for step in range(12)]
    assert [len(f) for f in steps] == [4, 12] * 6
    first = [f.uid for facts in steps[:6] for f in facts]  # 3 cycles of 16 fill an epoch of 50
    assert len(first) == len(set(first)) == 48
    assert [f.uid for f in steps[6][:4]] != first[:4]  # a new shuffle
    assert order_trainer([4, 12]).step_facts(7) == steps[7]  # a function of (seed, step) alone
    with pytest.raises(ValueError, match="need at least 52 training facts"):
        order_trainer([40, 12])
    with pytest.raises(ValueError, match="must be positive"):
        order_trainer([4, 0])


def test_meta_training_raises_heldout_edit_success():
    torch.manual_seed(0)
    # a larger init scale gives the random model peaked, editable predictions
    model, tok = tiny.llama(layers=4, hidden=64, inter=256, init=0.3), tiny.tokenizer()
    heldout = tiny.facts(32, seed=2)
    editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=32), lm_batch_size=16))
    es_untrained = evaluate(editor, heldout, 16, generate=False)["ES"]
    trainer = Trainer(editor, tiny.facts(400, seed=1), heldout,
                      TrainConfig(n_edits=16, steps=60, val_every=1000, lr=1e-3, scalar_lr=5e-2), "/tmp/unused")
    trainer.meta_step(trainer.step_facts(0), 0)  # calibrates the step size, then one update
    es_calibrated = evaluate(editor, heldout, 16, generate=False)["ES"]
    loss_start = heldout_meta_loss(trainer, heldout[:16])
    for step in range(1, 60):
        trainer.meta_step(trainer.step_facts(step), step)
    loss_end = heldout_meta_loss(trainer, heldout[:16])
    es_trained = evaluate(editor, heldout, 16, generate=False)["ES"]
    assert es_trained >= es_untrained + 0.3, (es_untrained, es_trained)
    assert es_trained >= es_calibrated + 0.15, (es_calibrated, es_trained)
    assert loss_end < 0.9 * loss_start, (loss_start, loss_end)


@pytest.mark.parametrize("dtype,budget,exact", [("fp32", 0.0, True), ("bf16", None, False), ("bf16", 0.0, False)])
def test_step_cache_spills_and_bf16_keep_the_meta_gradients(dtype, budget, exact, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the spill files land here
    torch.manual_seed(0)
    model, tok = tiny.llama(layers=3), tiny.tokenizer()
    ed = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8, eta_init=0.5), lm_batch_size=3, hyper_batch_size=7))
    facts = tiny.facts(8, seed=3)
    reference, _ = tiny.meta_gradients(ed, facts)
    cached, _ = tiny.meta_gradients(ed, facts, cache_dtype=dtype, cache_budget_mb=budget)
    assert not list(tmp_path.iterdir())  # spill files are removed when the step ends
    for name, g in reference.items():
        if exact:
            assert torch.equal(cached[name], g), name
        else:
            assert torch.allclose(cached[name], g, rtol=0.1, atol=1e-2 * g.abs().max()), name


def test_step_cache_spills_to_memory_mapped_files(tmp_path):
    from malmen.cache import StepCache

    x = {"a": torch.randn(5, 3), "b": torch.randn(2, 4)}
    with StepCache("bf16", budget_mb=0.0, directory=str(tmp_path)) as cache:
        y, = cache.put(x)
        files = list(next(tmp_path.iterdir()).iterdir())
        assert len(files) == 2 and cache.spilled_mb > 0
        assert y["a"].dtype == torch.bfloat16 and torch.equal(y["a"], x["a"].to(torch.bfloat16))
    assert not list(tmp_path.iterdir())
    with StepCache("fp32", budget_mb=1.0) as cache:
        assert torch.equal(cache.put(x)[0]["a"], x["a"]) and cache.spilled_mb == 0


@pytest.mark.parametrize("field, value, message", [
    ("c_loc", -1.0, "c_loc must be zero or positive, not -1.0"),
    ("c_edit", math.nan, "c_edit must be zero or positive, not nan"),
    ("first_token_weight", 0.0, "first_token_weight must be positive, not 0.0"),
    ("clip", -0.5, "clip must be positive, not -0.5"),
    ("val_n", 0, "val_n must be at least 1, not 0"),
    ("cache_dtype", "fp16", "cache_dtype must be fp32 or bf16, not fp16"),
])
def test_a_setting_no_run_can_use_is_refused_when_the_trainer_is_built(field, value, message):
    editor = MalmenEditor(tiny.llama(layers=2), tiny.tokenizer(), EditorConfig(hyper=HyperConfig(rank=4)))
    with pytest.raises(ValueError, match=message):
        Trainer(editor, tiny.facts(50, seed=1), [], TrainConfig(n_edits=8, **{field: value}), "/tmp/unused")
    assert TrainConfig(n_edits=8, lr=0.0, c_loc=0.0).check().lr == 0.0  # zero switches a term off: allowed
