import pytest
import torch

import tiny
from malmen.contexts import PREFIXES, in_contexts, prefixes
from malmen.editor import EditorConfig, MalmenEditor
from malmen.hypernet import HyperConfig


def test_each_fact_comes_first_then_its_copies_behind_each_context():
    facts = tiny.facts(2)
    out = list(in_contexts(facts, ["A.", "B."]))
    assert [f.prompt for f in out] == [facts[0].prompt, f"A. {facts[0].prompt}", f"B. {facts[0].prompt}",
                                       facts[1].prompt, f"A. {facts[1].prompt}", f"B. {facts[1].prompt}"]
    assert all(f.target == facts[0].target for f in out[:3])
    assert list(in_contexts(facts, [])) == facts


def test_prefixes_refuses_more_than_it_has():
    assert prefixes(0) == [] and prefixes(2) == list(PREFIXES[:2])
    with pytest.raises(ValueError, match="between 0 and"):
        prefixes(len(PREFIXES) + 1)


def test_an_edit_in_contexts_is_the_edit_of_the_facts_and_their_prefixed_copies():
    """The contexts are nothing but more facts to the solve: the same shifts as editing the copies
    written out by hand."""
    model, tok = tiny.llama(), tiny.tokenizer()
    torch.manual_seed(0)
    config = EditorConfig(hyper=HyperConfig(rank=8, eta_init=1.0), lm_batch_size=3)
    editor = MalmenEditor(model, tok, config)
    facts = tiny.facts(5)
    plain = editor.shifts(list(in_contexts(facts, ["w1 w2", "w3"])))
    editor.config.contexts = ["w1 w2", "w3"]
    within = editor.shifts(facts)
    bare = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8, eta_init=1.0), lm_batch_size=3),
                        hypernet=editor.hypernet).shifts(facts)
    for m in editor.modules:
        torch.testing.assert_close(within[m], plain[m], rtol=1e-4, atol=1e-6)
        assert not torch.allclose(within[m], bare[m])


def test_contexts_are_saved_with_the_editor(tmp_path):
    model, tok = tiny.llama(), tiny.tokenizer()
    editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8), contexts=prefixes(3)))
    editor.save_pretrained(tmp_path / "e")
    assert MalmenEditor.from_pretrained(tmp_path / "e", model, tok).config.contexts == list(PREFIXES[:3])
