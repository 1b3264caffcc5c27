import pytest

import tiny
from malmen.baselines import FineTuneConfig, FineTuneEditor
from malmen.editor import EditorConfig, MalmenEditor
from malmen.evaluate import evaluate
from malmen.hypernet import HyperConfig


def test_shared_unedited_cache_gives_the_same_figures_with_fewer_forwards():
    model, tok = tiny.llama(layers=4, hidden=64, inter=128, init=0.3), tiny.tokenizer()
    modules = ["model.layers.2.mlp.down_proj", "model.layers.3.mlp.down_proj"]
    malmen = MalmenEditor(model, tok, EditorConfig(modules=modules, hyper=HyperConfig(rank=16), lm_batch_size=4))
    ft = FineTuneEditor(model, tok, FineTuneConfig(modules=list(malmen.modules), steps=3, lr=1e-2, lm_batch_size=4))
    assert malmen.adapter.lowest_block(malmen.modules) > 0  # something to replay
    facts = tiny.facts(8)
    calls = []
    counter = model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))

    def run(cache):
        out = []
        for editor in (malmen, ft):
            calls.clear()
            out.append((evaluate(editor, facts, 4, generate=False, unedited=cache), len(calls)))
        return out

    plain, shared = run(None), run({})
    counter.remove()
    for (a, _), (b, _) in zip(plain, shared):
        assert a["before"] == b["before"]
        assert all(abs(a[k] - b[k]) < 1e-9 for k in ("ES", "GS", "LS", "ES_exact", "GS_exact", "LS_data"))
    assert shared[0][1] == plain[0][1]           # the first editor fills the cache
    assert shared[1][1] < plain[1][1]            # the second skips the unedited forwards


def test_unedited_cache_is_keyed_by_the_facts():
    """Reusing the cache dict for other facts (same n, same group index) must not report the
    first facts' unedited figures."""
    import dataclasses

    model, tok = tiny.llama(init=0.3), tiny.tokenizer()
    editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8), lm_batch_size=4))
    facts = tiny.facts(8, seed=1)
    # the same prompts with the unedited model's own answers: unedited ES 1 instead of about 0
    answers = editor.adapter.continuations([f.prompt for f in facts], 1)
    own = [dataclasses.replace(f, target=a.strip()) for f, a in zip(facts, answers)]
    cache: dict = {}
    first = evaluate(editor, facts, 8, generate=False, unedited=cache)
    fresh = evaluate(editor, own, 8, generate=False)
    reused = evaluate(editor, own, 8, generate=False, unedited=cache)
    assert fresh["before"]["ES"] == 1.0 and first["before"]["ES"] < 0.5
    assert reused["before"] == fresh["before"] and reused["ES"] == fresh["ES"]


def test_gs_chat_asks_the_rephrase_through_the_chat_template():
    from malmen.evaluate import snapshot

    model, tok = tiny.llama(init=0.3), tiny.tokenizer()
    editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8), lm_batch_size=4))
    facts = tiny.facts(4)
    assert "GS_chat" not in evaluate(editor, facts, 4, generate=False)  # no template, no GS_chat
    tok.chat_template = "{% for m in messages %}nq question {{ m['content'] }} {% endfor %}a "
    asked = []
    real = editor.adapter.batch
    editor.adapter.batch = lambda prompts, answers: asked.extend(prompts) or real(prompts, answers)
    metrics, _ = snapshot(editor.adapter, facts, generate=False)
    assert len(metrics["GS_chat"]) == 4
    assert [f"nq question {f.rephrases[0]} a " for f in facts] == asked[-4:]
    # the answer follows the template's turn directly: no extra space before it
    ids, start, _ = editor.adapter.encode("nq question who a ", "paris")
    assert ids[start:] == tok("paris", add_special_tokens=False)["input_ids"]


def test_edit_reports_are_averaged_over_groups_entry_by_entry():
    from malmen.evaluate import mean_reports, report_lines

    mean = lambda v: sum(v) / len(v)
    reports = [{"fit": {"a": 0.5, "b": 1.0}, "s": 2.0}, {"fit": {"a": 0.7, "b": 0.0}, "s": 4.0}]
    merged = mean_reports(reports, mean)
    assert set(merged) == {"fit", "s"} and merged["s"] == 3.0
    assert merged["fit"] == pytest.approx({"a": 0.6, "b": 0.5})
    assert mean_reports([{}, {}], mean) == {}
    lines = report_lines({"fit": {"a": 0.6, "b": 0.5}, "room": {"a": 0.1, "b": 0.3}})
    assert len(lines) == 2 and "wrote 55.0%" in lines[0] and "a 0.600, b 0.500" in lines[0]
    assert lines[1].startswith("room: ") and "written 20.0%" in lines[1] and report_lines({}) == []
