"""perplexity.py: the perplexity of ordinary text, and eval's PPL before and after an edit."""
import math

import pytest
import torch

import tiny
from malmen.adapters import adapter_for
from malmen.editor import EditorConfig, MalmenEditor
from malmen.evaluate import evaluate
from malmen.hypernet import HyperConfig
from malmen.perplexity import perplexity, read_text, windows

TEXT = ("The river runs past the old mill and under the stone bridge, where the children of the village "
        "watch the boats go by on summer evenings. ") * 6


def direct(model, rows) -> float:
    """exp(mean cross-entropy) over every window's tokens after its first, one window at a time (no padding)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in rows:
            logits = model(input_ids=ids[None]).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits.double(), ids[1:], reduction="sum"))
            count += len(ids) - 1
    return math.exp(nll / count)


def test_windows_cut_the_first_tokens_into_windows_and_drop_a_last_one_that_predicts_nothing():
    tok = tiny.tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    rows = windows(tok, TEXT, window=16, limit=50)
    assert [len(r) for r in rows] == [16, 16, 16, 2] and torch.cat(rows).tolist() == ids[:50]
    assert [len(r) for r in windows(tok, TEXT, window=16, limit=49)] == [16, 16, 16]  # a 1-token tail predicts nothing
    with pytest.raises(ValueError, match="shorter than two tokens"):
        windows(tok, "a", window=16)
    with pytest.raises(ValueError, match="at least two tokens"):
        windows(tok, TEXT, window=1)


def test_perplexity_equals_the_mean_cross_entropy_of_each_window_alone():
    """Windows of unequal length share forward passes (right-padded): the figure equals each
    window's own cross-entropy, summed over all predicted tokens, whatever the batch size."""
    model, tok = tiny.llama(init=0.3), tiny.tokenizer()
    adapter = adapter_for(model, tok)
    rows = windows(tok, TEXT, window=24, limit=90)
    assert len({len(r) for r in rows}) == 2  # a shorter last window: padding is exercised
    expected = direct(model, rows)
    for batch_size in (1, 2, 8):
        assert perplexity(adapter, rows, batch_size) == pytest.approx(expected, rel=1e-5)


def test_eval_reports_the_perplexity_unedited_and_after_each_edit_and_the_revert_restores_it():
    model, tok = tiny.llama(init=0.3), tiny.tokenizer()
    editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8, eta_init=1.0), lm_batch_size=4))
    rows = windows(tok, TEXT, window=32)
    unedited = direct(model, rows)
    result = evaluate(editor, tiny.facts(8), 4, generate=False, texts=rows)
    assert result["before"]["PPL"] == pytest.approx(unedited, rel=1e-5)
    assert result["PPL"] != pytest.approx(unedited, rel=1e-4)  # the edits move ordinary text too
    handle = editor.edit(tiny.facts(8)[:4])
    first_group = direct(model, rows)
    handle.revert()
    assert direct(model, rows) == unedited  # reverted exactly
    assert first_group != unedited
    assert "PPL" not in evaluate(editor, tiny.facts(4), 4, generate=False)  # only with texts


def test_a_model_that_does_not_predict_text_has_no_perplexity_and_the_command_line_refuses_it_unrun():
    """The adapter says so (``predicts_text``): the command line refuses the text naming the file
    without running the model."""
    import argparse

    from malmen.cli.common import UsageError, text_windows

    adapter = adapter_for(tiny.t5(), tiny.tokenizer())
    assert not adapter.predicts_text and adapter_for(tiny.llama(), tiny.tokenizer()).predicts_text
    with pytest.raises(ValueError, match="perplexity needs a model that predicts text"):
        perplexity(adapter, windows(tiny.tokenizer(), TEXT, window=16))
    calls = []
    adapter.model.register_forward_pre_hook(lambda *_: calls.append(1))
    args = argparse.Namespace(ppl_text="prose.txt", ppl_tokens=64)
    with pytest.raises(UsageError, match="^prose.txt: perplexity needs a model that predicts text"):
        text_windows(args, TEXT, adapter)
    assert calls == []


def test_a_file_that_cannot_serve_is_refused_naming_it(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for name, message in (("missing.txt", "cannot be read as UTF-8 text"), ("empty.txt", "holds no text"),
                          ("latin1.txt", "cannot be read as UTF-8 text")):
        with pytest.raises(ValueError, match=message) as err:
            read_text(tmp_path / name)
        assert str(err.value).startswith(str(tmp_path / name))
    (tmp_path / "ok.txt").write_text(TEXT)
    assert read_text(tmp_path / "ok.txt") == TEXT


def test_bench_quality_gives_every_row_the_perplexity_and_measures_the_unedited_one_once():
    from malmen.baselines import FineTuneConfig, FineTuneEditor
    from malmen.bench import run_quality

    model, tok = tiny.llama(init=0.3), tiny.tokenizer()
    malmen = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8, eta_init=1.0), lm_batch_size=4))
    ft = FineTuneEditor(model, tok, FineTuneConfig(modules=list(malmen.modules), steps=3, lr=1e-2, lm_batch_size=4))
    rows_ = windows(tok, TEXT, window=32)
    calls = []
    original = malmen.adapter.text_logprobs
    for editor in (malmen, ft):  # count the perplexity passes of both editors' adapters
        editor.adapter.text_logprobs = lambda texts, f=original: (calls.append(1), f(texts))[1]
    rows = run_quality({"malmen": malmen, "ft": ft}, [("tiny", "new", tiny.facts(8))], [4], facts_per_point=8,
                       generate=False, log=lambda m: None, texts=rows_)
    unedited = direct(model, rows_)
    assert [r["method"] for r in rows] == ["malmen", "ft"]
    assert all(r["before_PPL"] == pytest.approx(unedited, rel=1e-5) and r["PPL"] > 0 for r in rows)
    batches = math.ceil(len(rows_) / 2)  # perplexity's default batch size
    assert len(calls) == batches * (1 + 2 + 2)  # unedited once, then after each of the 2 groups of each editor
