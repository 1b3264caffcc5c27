"""trunkstore.py: stored hidden states replace the frozen blocks exactly enough, and the
meta-gradients with a store equal those without, within a stated tolerance."""
import pytest
import torch

import tiny
from malmen.adapters import adapter_for
from malmen.editor import EditorConfig, MalmenEditor
from malmen.hypernet import HyperConfig
from malmen.trunkstore import TrunkStore


def test_replayed_states_give_the_models_logits_and_skip_the_frozen_blocks(tmp_path):
    model, tok = tiny.llama(layers=4, init=0.3), tiny.tokenizer()
    adapter = adapter_for(model, tok)
    trunk = adapter.trunk(["model.layers.2.mlp.down_proj"])
    store = TrunkStore(tmp_path / "s", model, trunk.blocks, trunk.upto, dtype="fp32")
    batch = adapter.batch(["what is the capital of w1", "who wrote w7 and w9 by w3"], ["paris rome", "alpha"])
    calls, top = [], []
    model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    model.model.layers[3].register_forward_hook(lambda *a: top.append(1))
    with torch.no_grad():
        plain = adapter.answer_logits(batch)
        calls.clear(), top.clear()
        with store.step(batch.input_ids, batch.attention_mask):  # missing rows: the frozen blocks alone run
            first = adapter.answer_logits(batch)
        assert (len(calls), len(top)) == (1, 1)  # the fill stopped below block 3; the answer pass replayed
        with store.step(batch.input_ids, batch.attention_mask):  # every row stored: replayed
            replayed = adapter.answer_logits(batch)
    assert (store.misses, store.hits, len(store)) == (2, 2, 2) and len(calls) == 1
    torch.testing.assert_close(first, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(replayed, first, rtol=0, atol=0)
    # a row is keyed by its tokens: the same prompt in another batch (other padding) is a hit
    other = adapter.batch(["who wrote w7 and w9 by w3"], ["alpha"])
    with torch.no_grad(), store.step(other.input_ids, other.attention_mask):
        alone = adapter.answer_logits(other)
    assert store.hits == 3
    torch.testing.assert_close(alone, plain[2:], rtol=1e-5, atol=1e-5)


def test_a_store_of_another_model_or_block_is_rebuilt(tmp_path):
    tok = tiny.tokenizer()
    a, b = adapter_for(tiny.llama(seed=1), tok), adapter_for(tiny.llama(seed=2), tok)
    batch = a.batch(["what is the capital of w1"], ["paris"])
    trunk = a.trunk(["model.layers.2.mlp.down_proj"])
    store = TrunkStore(tmp_path / "s", a.model, trunk.blocks, trunk.upto)
    with torch.no_grad(), store.step(batch.input_ids, batch.attention_mask):
        a.answer_logits(batch)
    assert len(TrunkStore(tmp_path / "s", a.model, trunk.blocks, trunk.upto)) == 0        # not flushed: recomputed
    store.flush()
    assert len(TrunkStore(tmp_path / "s", a.model, trunk.blocks, trunk.upto)) == 1        # reopened: kept
    assert len(TrunkStore(tmp_path / "s", a.model, trunk.blocks, trunk.upto - 1)) == 0    # another block
    other = b.trunk(["model.layers.2.mlp.down_proj"])
    assert len(TrunkStore(tmp_path / "s", b.model, other.blocks, other.upto)) == 0        # another model


@pytest.mark.parametrize("dtype,rtol", [("fp32", 1e-4), ("fp16", 2e-2)])
def test_meta_gradients_with_a_store_equal_those_without(dtype, rtol, tmp_path):
    """Tolerance: fp32 states, 1e-4 relative (batching order only); fp16 states, 2e-2 relative
    (fp16 keeps 11 significant bits of each state), both against the largest gradient entry."""
    torch.manual_seed(0)
    model, tok = tiny.llama(layers=4, init=0.3), tiny.tokenizer()
    modules = ["model.layers.2.mlp.down_proj", "model.layers.3.mlp.down_proj"]
    ed = MalmenEditor(model, tok, EditorConfig(modules=modules, hyper=HyperConfig(rank=8, eta_init=0.5), lm_batch_size=3))
    facts = tiny.facts(8, seed=3)
    reference, _ = tiny.meta_gradients(ed, facts)
    filling, trainer = tiny.meta_gradients(ed, facts, trunk_store=str(tmp_path / "s"), trunk_dtype=dtype)
    assert trainer.store.misses == 8 * 3  # edit, rephrase and locality prompt of 8 facts, each once
    replayed, trainer = tiny.meta_gradients(ed, facts, trunk_store=str(tmp_path / "s"), trunk_dtype=dtype)
    assert trainer.store.misses == 0 and trainer.store.hits == 8 * 4  # every row replayed (locality: before and after)
    for name, g in reference.items():
        scale = g.abs().max()
        # the first run fills the store, then replays it too
        assert torch.allclose(filling[name], g, rtol=rtol, atol=rtol * scale), name
        assert torch.allclose(replayed[name], g, rtol=rtol, atol=rtol * scale), name
