"""keystats.py and memit.py: streamed statistics equal those at once and are cached; MEMIT's
update moves the top layer's output at the key to the optimised value; AlphaEdit's leaves the
preserved keys' outputs where they were."""
import dataclasses

import pytest
import torch

import tiny
from malmen.adapters import adapter_for
from malmen.editor import EditHandle
from malmen.keystats import Corpus, SecondMoments, accumulate, key_moments, sample_corpus
from malmen.memit import MemitConfig, MemitEditor, default_layers, parse_layers
from malmen.tracing import KeyGradTrace

CORPUS = Corpus(texts=24, length=12, batch_size=8)


def with_subjects(facts):
    return [dataclasses.replace(f, subject=f.prompt.split()[-1]) for f in facts]


def test_streamed_statistics_equal_those_at_once_and_are_cached(tmp_path):
    model, tok = tiny.llama(init=0.3), tiny.tokenizer()
    modules = adapter_for(model, tok).default_modules(2)
    batches = list(sample_corpus(model, tok, CORPUS))
    assert len(batches) == 3 and all(b.shape[1] == CORPUS.length for b in batches)
    streamed = accumulate(model, modules, batches)
    at_once = accumulate(model, modules, [torch.cat(batches)])
    assert streamed.count == at_once.count == CORPUS.texts * CORPUS.length
    for m in modules:
        keys = []
        for ids in batches:
            with torch.no_grad(), KeyGradTrace(model, [m], None, keep_grads=False) as t:
                model(input_ids=ids)
            keys.append(t.keys[m].double())
        k = torch.cat(keys)
        assert torch.allclose(streamed.mean(m), k.T @ k / len(k), rtol=1e-5, atol=1e-5)  # fp32 products
        assert torch.allclose(streamed.mean(m), at_once.mean(m), rtol=1e-5, atol=1e-5)
    first = key_moments(model, tok, modules, CORPUS, tmp_path)
    again = key_moments(model, tok, modules, CORPUS, tmp_path)
    assert first.seconds > 0 and again.seconds == 0.0
    assert all(torch.equal(first.sums[m], again.sums[m]) for m in modules)
    other = key_moments(model, tok, modules, dataclasses.replace(CORPUS, seed=1), tmp_path)
    assert other.seconds > 0 and not torch.equal(other.sums[modules[0]], first.sums[modules[0]])
    assert len(list((tmp_path / "keystats").iterdir())) == 2
    # another layer set: the kept texts, one forward pass for the new layer, the cached one reread
    more = adapter_for(model, tok).default_modules(3)
    wider = key_moments(model, tok, more, CORPUS, tmp_path)
    assert wider.seconds > 0 and all(torch.equal(wider.sums[m], first.sums[m]) for m in modules)
    assert torch.allclose(wider.mean(more[0]), accumulate(model, more[:1], batches).mean(more[0]), rtol=1e-5, atol=1e-5)
    assert key_moments(model, tok, more, CORPUS, tmp_path).seconds == 0.0


def test_answer_moments_sum_the_keys_at_the_answer_positions_only():
    from malmen.keystats import answer_moments

    model, tok = tiny.llama(init=0.3), tiny.tokenizer()
    adapter = adapter_for(model, tok)
    modules = adapter.default_modules(2)
    facts = tiny.facts(7)
    prompts, answers = [f.locality_prompt for f in facts], [f.locality_answer for f in facts]
    moments = answer_moments(adapter, modules, prompts, answers, batch_size=3)
    batch = adapter.batch(prompts, answers)
    with torch.no_grad(), KeyGradTrace(model, modules, None, keep_grads=False) as t:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert moments.count == int(batch.mask.sum())
    for m in modules:
        k = t.keys[m].reshape(*batch.mask.shape, -1)[batch.mask].double()  # every position traced, the answers kept
        reference = k.T @ k / len(k)
        # fp32 keys traced in batches of another shape: the rounding scales with the largest entry (about 2e-6
        # of it on one machine, 1e-4 absolute), where a wrong position would be off by the entries themselves
        assert torch.allclose(moments.mean(m), reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


def test_key_prior_has_the_identitys_trace_and_blends_with_it():
    from malmen.keystats import key_prior

    k = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)) * torch.arange(1.0, 7.0)
    c = (k.T @ k / 50).double()
    prior = key_prior(c)
    assert torch.allclose(prior.trace(), torch.tensor(6.0, dtype=torch.float64))
    assert torch.allclose(prior, c * 6 / c.trace())  # the direction of C, the scale of I
    assert torch.equal(key_prior(c, 0.0), torch.eye(6, dtype=torch.float64))
    assert torch.allclose(key_prior(c, 0.25), 0.75 * torch.eye(6, dtype=torch.float64) + 0.25 * prior)


def test_layers_are_parsed_and_scaled_to_depth():
    assert parse_layers("3-5,8") == [3, 4, 5, 8]
    assert default_layers(28) == [3, 4, 5, 6, 7, 8]   # MEMIT's GPT-J layers


def editor(projection="none", layers=(2,), **extra):
    model, tok = tiny.llama(init=0.3), tiny.tokenizer()
    config = MemitConfig(layers=list(layers), projection=projection, corpus=CORPUS, cache=None, v_steps=40,
                         lm_batch_size=4, **extra)
    return MemitEditor(model, tok, config)


def top_output(ed, facts):
    """Block L's output at each fact's last subject token."""
    keys, top = ed._keys_and_top(facts, ed.modules[-1])
    return top


def test_memit_moves_the_output_at_the_key_to_the_target():
    ed = editor(mom2_weight=1e-4)   # C barely weighs: the update must reach z
    fact = with_subjects(tiny.facts(1, seed=3))
    z = ed.targets(fact).double()
    before = top_output(ed, fact)
    assert (z - before).norm() > 1e-3
    with ed.edit(fact):
        after = top_output(ed, fact)
    assert torch.allclose(after, z, atol=1e-3 * float(z.norm()))
    assert torch.equal(top_output(ed, fact), before)  # reverted exactly


def test_memit_makes_the_answers_likely_and_reverts_exactly():
    ed = editor(layers=(1, 2), mom2_weight=1.0)  # λ on this tiny model's scale
    facts = with_subjects(tiny.facts(6, seed=4))
    base = {n: p.clone() for n, p in ed.model.named_parameters()}
    batch = ed._batch(facts)
    from malmen.editor import finetune_loss

    with torch.no_grad():
        loss_before = float(finetune_loss(ed.adapter.answer_logits(batch), batch))
        with ed.edit(facts):
            loss_after = float(finetune_loss(ed.adapter.answer_logits(batch), batch))
    assert loss_after < 0.5 * loss_before
    assert all(torch.equal(p, base[n]) for n, p in ed.model.named_parameters())
    assert all(p.grad is None for p in ed.model.parameters())


def test_alphaedit_leaves_the_preserved_keys_outputs_unchanged():
    ed = editor("null")
    name = ed.modules[0]
    moments = key_moments(ed.model, ed.adapter.tokenizer, ed.modules, CORPUS)
    c = moments.mean(name)
    values = torch.linalg.eigvalsh(c)
    ed.config.null_threshold = float(values[len(values) // 2])  # half the key space is "null" here
    facts = with_subjects(tiny.facts(4, seed=5))
    shift = ed.shifts(facts)[name].double()
    memit = editor(mom2_weight=1.0).shifts(facts)[name].double()  # the same facts, unprojected
    assert shift.abs().max() > 0

    def moved(s):  # mean squared change of the layer's output over the preserved keys: tr(SᵀCS)
        return float(torch.trace(s.T @ c @ s))

    # every row of S lies in the null space (MEMIT's do not), where C's eigenvalues are below the threshold
    outside = torch.eye(len(c), dtype=c.dtype) - ed.preserved()[name]
    assert (outside @ shift).norm() <= 1e-6 * shift.norm()  # S is returned in fp32 (unit roundoff 6e-8)
    assert (outside @ memit).norm() >= 0.1 * memit.norm()
    assert moved(shift) <= ed.config.null_threshold * float((shift ** 2).sum()) * (1 + 1e-6)


def test_alphaedit_and_memit_through_the_method_registry(tmp_path):
    from malmen.methods import METHODS

    model, tok = tiny.llama(init=0.3), tiny.tokenizer()
    options = {"memit_layers": "1-2", "stats_texts": 16, "stats_dir": str(tmp_path), "memit_steps": 5,
               "null_threshold": 1e9}  # every direction of the tiny model counts as null
    for name in ("memit", "alphaedit"):
        ed = METHODS[name].build(model, tok, options=options)
        assert ed.config.layers == [1, 2] and ed.config.projection == ("null" if name == "alphaedit" else "none")
        base = {n: p.clone() for n, p in model.named_parameters()}
        handle = ed.edit(with_subjects(tiny.facts(3, seed=6)))
        assert any(not torch.equal(p, base[n]) for n, p in model.named_parameters()) or name == "alphaedit"
        handle.revert()
        assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())


def test_the_library_defaults_are_the_command_line_defaults():
    """MemitConfig reads its defaults from the methods' options: written once."""
    from malmen.memit import MemitConfig
    from malmen.methods import default

    config = MemitConfig()
    assert (config.v_steps, config.v_lr, config.mom2_weight, config.null_threshold, config.l2) == (
        default("--memit-steps"), default("--memit-lr"), default("--memit-lambda"), default("--null-threshold"),
        default("--alpha-l2"))
    assert config.mom2_weight == 1000.0  # the sweep's choice for SmolLM2 (docs/RESULTS.md)
