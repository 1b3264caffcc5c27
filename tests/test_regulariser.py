"""regulariser.py: the shape P of the regulariser lambda P, as a part of the editor (ShapedRegulariser):
statistics from sampled text or facts' locality keys, kept with the editor in eigenpairs (keystats.py)."""
import pytest
import torch

import tiny
from malmen.editor import EditorConfig, MalmenEditor
from malmen.facts import Fact
from malmen.hypernet import HyperConfig


def test_a_keys_shaped_regulariser_uses_the_key_statistics_and_is_saved(tmp_path):
    """regulariser='keys': each module's normal equation is regularised by lambda times the keys'
    second moment over the model's own samples, trace-matched to the identity (keystats.key_prior);
    the statistics are cached in stats_dir; the setting is saved; mix 0 is the paper's lambda I."""
    from malmen.keystats import Corpus, key_moments

    model, tok = tiny.llama(init=0.3), tiny.tokenizer()
    config = dict(hyper=HyperConfig(rank=8, eta_init=0.5), lm_batch_size=3)
    plain = MalmenEditor(model, tok, EditorConfig(**config))
    shaped = MalmenEditor(model, tok, EditorConfig(regulariser="keys", **config), hypernet=plain.hypernet)
    shaped.stats_dir, shaped.corpus = str(tmp_path / "stats"), Corpus(texts=16, length=12, batch_size=8)
    facts = tiny.facts(6)
    assert shaped.prepare() > 0 and shaped.prepare() == 0.0  # computed once, then kept
    priors = shaped.priors()
    moments = key_moments(model, tok, shaped.modules, shaped.corpus, cache=tmp_path / "stats")  # from the cache
    for m in shaped.modules:
        c, P = moments.mean(m), priors[m].matrix
        assert torch.allclose(P, c * (len(c) / c.trace()))
        assert torch.allclose(P.trace(), torch.tensor(float(len(c)), dtype=torch.float64))
        assert torch.allclose(priors[m].factor @ priors[m].factor.t(), P)
    # made once: every edit reuses the shapes and their factors until the mix or the statistics change
    assert all(shaped.priors()[m] is priors[m] for m in shaped.modules)
    ours, paper = shaped.shifts(facts), plain.shifts(facts)
    assert all(not torch.allclose(ours[m], paper[m], atol=1e-2 * float(paper[m].abs().max())) for m in ours)
    shaped.config.prior_mix = 0.0  # the kept statistics, reweighed
    assert all(torch.equal(shaped.priors()[m].matrix, torch.eye(len(priors[m].matrix), dtype=torch.float64))
               for m in shaped.modules)
    identity = shaped.shifts(facts)
    # both solve these few tokens in the fp64 dual form, the shaped one in keys whitened by P = I
    assert all(torch.allclose(identity[m], paper[m], atol=1e-6 * float(paper[m].abs().max())) for m in ours)
    shaped.config.prior_mix = 1.0
    shaped.save_pretrained(tmp_path / "ed")
    loaded = MalmenEditor.from_pretrained(tmp_path / "ed", model, tok)
    assert loaded.config.regulariser == "keys" and loaded.config.prior_mix == 1.0
    few = MalmenEditor(model, tok, EditorConfig(regulariser="keys", **config), hypernet=plain.hypernet)
    few.stats_facts = facts[:3]  # three locality answers: far fewer keys than the key size
    with pytest.raises(ValueError, match="fewer than the key size"):
        few.shifts(facts)
    few.config.prior_mix = 0.5  # the identity's share keeps P positive definite
    assert all(torch.isfinite(s).all() for s in few.shifts(facts).values())
    first = few.key_statistics()[0]
    for _ in range(3):  # a new list of other facts, even where the old list's memory is reused, is a new source
        few.stats_facts = list(tiny.facts(4, seed=7))
        assert few.key_statistics()[1] != 3 or not all(torch.equal(few.key_statistics()[0][m], first[m]) for m in first)
    with pytest.raises(ValueError, match="regulariser must be one of"):
        MalmenEditor(model, tok, EditorConfig(regulariser="diagonal", **config))


def test_a_kept_prior_edits_as_the_statistics_it_was_kept_from_and_travels_with_the_editor(tmp_path):
    """keep_prior: the regulariser's shape from facts' locality keys, kept in eigenpairs (float16
    vectors) and saved (prior.safetensors); the loaded editor edits with it, computing no statistics;
    new statistics given replace it."""
    model, tok = tiny.llama(init=0.3), tiny.tokenizer()
    editor = MalmenEditor(model, tok, EditorConfig(regulariser="keys", prior_mix=0.5,
                                                   hyper=HyperConfig(rank=8, eta_init=0.5), lm_batch_size=3))
    facts = tiny.facts(6)
    editor.use_statistics_of(tiny.facts(30, seed=3))
    reference = editor.shifts(facts)
    editor.keep_prior(rank=64)  # the whole key size: P itself, but for the vectors' rounding
    assert editor.stats_facts is None and editor.metadata["kept_prior"]["rank"] == 64
    kept = editor.shifts(facts)
    for m in reference:
        torch.testing.assert_close(kept[m], reference[m], rtol=2e-2, atol=2e-2 * float(reference[m].abs().max()))
    editor.save_pretrained(tmp_path / "ed")
    loaded = MalmenEditor.from_pretrained(tmp_path / "ed", model, tok)
    again = loaded.shifts(facts)
    assert loaded._moments is None  # no statistics taken: the kept shape served
    assert all(torch.allclose(again[m], kept[m], rtol=1e-5, atol=1e-7) for m in kept)
    loaded.use_statistics_of(tiny.facts(30, seed=4))
    assert loaded.kept_prior is None and "kept_prior" not in loaded.metadata
    assert not any(torch.allclose(s, kept[m]) for m, s in loaded.shifts(facts).items())


def test_a_prior_kept_at_a_lower_rank_keeps_its_top_eigenpairs_and_its_diagonal():
    from malmen.keystats import compressed_prior, expanded_prior, key_prior, low_rank

    torch.manual_seed(0)
    x = torch.randn(200, 16, dtype=torch.float64) * torch.linspace(3, 0.1, 16, dtype=torch.float64)
    P = key_prior(x.T @ x / 200)
    parts = compressed_prior(P, 4)
    assert parts["vectors"].dtype == torch.float16 and parts["vectors"].shape == (16, 4)
    back = expanded_prior(**parts)
    assert torch.allclose(back.diagonal(), P.diagonal(), atol=1e-6) and torch.allclose(back.trace(), P.trace())
    v = torch.linalg.eigh(P)[1].flip(1)[:, :4]
    low = low_rank(parts["vectors"], parts["values"])
    assert torch.allclose(v.T @ low @ v, torch.diag(torch.linalg.eigvalsh(P).flip(0)[:4]), atol=2e-2)
    assert torch.linalg.norm(back - P) < torch.linalg.norm(low - P)  # the diagonal only takes error away
    top = float(torch.linalg.eigvalsh(P)[-1])
    assert torch.allclose(expanded_prior(**compressed_prior(P, 16)), P, atol=2e-3 * top)


def test_rephrase_moments_are_the_second_moment_of_each_answer_keys_move_from_prompt_to_rephrase():
    """keystats.rephrase_moments: E[(k' - k)(k' - k)ᵀ], k' and k read at the same answer token after
    the rephrase and after the prompt, equal to the moves computed from each pair's own trace."""
    from malmen.adapters import adapter_for
    from malmen.keystats import rephrase_moments
    from malmen.tracing import KeyGradTrace

    model, tok = tiny.llama(init=0.3), tiny.tokenizer()
    adapter, modules, facts = adapter_for(model, tok), ["model.layers.1.mlp.down_proj"], tiny.facts(7, seed=2)
    moves = rephrase_moments(adapter, modules, [f.prompt for f in facts], [f.rephrases[0] for f in facts],
                             [f.target for f in facts], batch_size=3)

    def keys(prompt, answer):
        batch = adapter.batch([prompt], [answer])
        with torch.no_grad(), KeyGradTrace(model, modules, adapter.key_rows(batch, modules), keep_grads=False) as t:
            adapter.answer_logits(batch)
        return t.keys[modules[0]].double()

    d = torch.cat([keys(f.rephrases[0], f.target) - keys(f.prompt, f.target) for f in facts])
    assert moves.count == len(d) > len(facts)  # every answer token of every fact (two words each)
    expected = d.T @ d / len(d)
    torch.testing.assert_close(moves.mean(modules[0]), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_a_rephrase_share_blends_the_moves_into_the_shape_kept_and_refused_without_facts(tmp_path):
    """use_statistics_of(facts, rephrase_share=r): the shape before the identity's mix is
    (1 - r) C' + r W' (each scaled to mean eigenvalue 1), the editor edits with it, keeps it
    (recorded in kept_prior) and r = 0 is the locality shape alone; refused without facts."""
    from malmen.keystats import key_prior

    model, tok = tiny.llama(init=0.3), tiny.tokenizer()
    editor = MalmenEditor(model, tok, EditorConfig(regulariser="keys", prior_mix=0.5,
                                                   hyper=HyperConfig(rank=8, eta_init=0.5), lm_batch_size=3))
    stats, facts = tiny.facts(30, seed=3), tiny.facts(6)
    editor.use_statistics_of(stats)
    C = {m: c.clone() for m, c in editor.key_statistics()[0].items()}
    plain = editor.shifts(facts)
    W = editor.rephrase_statistics()
    editor.use_statistics_of(stats, rephrase_share=0.25)
    means, _ = editor.key_statistics()
    for m in editor.modules:
        expected = 0.75 * key_prior(C[m]) + 0.25 * key_prior(W[m])
        torch.testing.assert_close(means[m], expected)
        torch.testing.assert_close(editor.priors()[m].matrix, 0.5 * torch.eye(len(expected), dtype=torch.float64)
                                   + 0.5 * expected)
    blended = editor.shifts(facts)
    assert not any(torch.allclose(blended[m], plain[m], rtol=1e-3) for m in plain)
    editor.keep_prior(rank=64)
    assert editor.metadata["kept_prior"]["rephrase_share"] == 0.25 and editor.rephrase_share == 0.0
    kept = editor.shifts(facts)
    for m in blended:
        torch.testing.assert_close(kept[m], blended[m], rtol=2e-2, atol=2e-2 * float(blended[m].abs().max()))
    with pytest.raises(ValueError, match="needs facts with rephrases"):
        editor.use_statistics_of(None, rephrase_share=0.5)
    with pytest.raises(ValueError, match="must lie in"):
        editor.use_statistics_of(stats, rephrase_share=1.5)
    bare = [Fact(prompt=f.prompt, target=f.target, locality_prompt=f.locality_prompt, locality_answer=f.locality_answer)
            for f in stats]
    editor.use_statistics_of(bare, rephrase_share=0.5)
    with pytest.raises(ValueError, match="no rephrases"):
        editor.shifts(facts)


def test_the_malmen_method_keeps_a_kept_shape_without_facts_and_refuses_a_rephrase_share_there(tmp_path):
    """methods' 'malmen' (editor.from_method): without stats_data the editor's kept shape stays in
    use; a rephrase share without facts is refused by use_statistics_of, the one check below the CLI's."""
    from malmen.methods import METHODS

    model, tok = tiny.llama(init=0.3), tiny.tokenizer()
    editor = MalmenEditor(model, tok, EditorConfig(regulariser="keys", prior_mix=0.5, lm_batch_size=3,
                                                   hyper=HyperConfig(rank=8, eta_init=0.5)))
    editor.use_statistics_of(tiny.facts(30, seed=3))
    editor.keep_prior(rank=16)
    editor.save_pretrained(tmp_path / "e")
    loaded = METHODS["malmen"].build(model, tok, str(tmp_path / "e"), {})
    assert loaded.stats_facts is None and loaded.kept_prior is not None
    for m in editor.modules:
        torch.testing.assert_close(loaded.priors()[m].matrix, editor.priors()[m].matrix)
    with pytest.raises(ValueError, match="needs facts with rephrases"):
        METHODS["malmen"].build(model, tok, str(tmp_path / "e"), {"rephrase_share": 0.5})


def test_the_malmen_method_takes_facts_or_a_file_for_its_statistics(tmp_path):
    """from_method's stats_data: facts already read are used as given (the first stats_texts of them);
    a path is read (its train part, never a held-out part's locality prompts)."""
    from malmen.datasets import load_facts
    from malmen.methods import METHODS

    model, tok = tiny.llama(init=0.3), tiny.tokenizer()
    MalmenEditor(model, tok, EditorConfig(lm_batch_size=3, hyper=HyperConfig(rank=8))).save_pretrained(tmp_path / "e")
    stats = tiny.facts(30, seed=3)
    tiny.write_facts(tmp_path / "stats.jsonl", stats)
    options = {"regulariser": "keys", "prior_mix": 0.5, "stats_texts": 20}
    given = METHODS["malmen"].build(model, tok, str(tmp_path / "e"), {**options, "stats_data": stats})
    read = METHODS["malmen"].build(model, tok, str(tmp_path / "e"), {**options, "stats_data": str(tmp_path / "stats.jsonl")})
    assert given.stats_facts == stats[:20]
    assert read.stats_facts == list(load_facts(tmp_path / "stats.jsonl", split="train"))[:20] != stats[:20]
