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
