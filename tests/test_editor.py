import pytest
import torch

import tiny
from malmen import linear
from malmen.editor import EditHandle, EditorConfig, MalmenEditor, trace
from malmen.hypernet import HyperConfig


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("aggregation", ["malmen", "sum"])
def test_edit_then_revert_is_bitwise_exact(dtype, aggregation):
    model, tok = tiny.llama(dtype=dtype), tiny.tokenizer()
    editor = MalmenEditor(model, tok, EditorConfig(aggregation=aggregation, hyper=HyperConfig(rank=8, eta_init=1.0), lm_batch_size=3))
    before = weights(model)
    handle = editor.edit(tiny.facts(7))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(n.rsplit(".", 1)[0] in editor.modules for n in changed)
    assert all(torch.isfinite(s).all() for s in handle.shifts.values())
    handle.revert()
    after = weights(model)
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_an_edit_reports_its_fit_which_a_larger_lambda_lowers():
    """``handle.report['fit']``: each module's R^2 of the solve (solver ``fit``), in (0, 1]; a
    larger regulariser writes the value differences less exactly; ``room``, the mean leverage,
    in (0, 1]; MEND's sum reports neither."""
    model, tok = tiny.llama(), tiny.tokenizer()
    torch.manual_seed(0)
    editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8, eta_init=1.0), lm_batch_size=3))
    fits = {}
    for scale in (1.0, 100.0):
        editor.config.lambda_scale = scale
        with editor.edit(tiny.facts(7)) as handle:
            fits[scale] = handle.report["fit"]
            assert set(handle.report["room"]) == set(editor.modules)
            assert all(0.0 < r <= 1.0 for r in handle.report["room"].values())
    assert set(fits[1.0]) == set(editor.modules)
    assert all(0.0 < fits[100.0][m] < fits[1.0][m] <= 1.0 for m in editor.modules), fits
    mend = MalmenEditor(model, tok, EditorConfig(aggregation="sum", hyper=HyperConfig(rank=8), lm_batch_size=3))
    with mend.edit(tiny.facts(3)) as handle:
        assert handle.report == {}


def test_lambda_follows_the_number_of_keys():
    """lambda(N) = lambda (N / N0)^alpha: alpha = 0 is one lambda for every N (the paper's; every
    editor saved before alpha existed); alpha = 1 with N0 = N / 2 is the learned lambda times 2."""
    model, tok = tiny.llama(), tiny.tokenizer()
    torch.manual_seed(0)
    editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8, eta_init=1.0), lm_batch_size=3))
    facts = tiny.facts(7)
    aggregator = editor.new_aggregator()
    for batch in editor.batches(facts):
        editor.accumulate(aggregator, *trace(editor.adapter, editor.modules, batch, editor.config.keys))
    N = {m: float(n) for m, n in aggregator.counts().items()}
    assert len(set(N.values())) == 1 and N[editor.modules[0]] > 1   # every module sees the answer tokens
    base = editor.shifts(facts)
    editor.config.lambda_scale = 2.0
    doubled = editor.shifts(facts)
    editor.config.lambda_scale = 1.0
    for ref in (N[editor.modules[0]] / 5, 1e6):   # alpha = 0: N0 does not matter
        editor.hypernet.config.lambda_tokens_ref = ref
        assert all(torch.equal(s, base[m]) for m, s in editor.shifts(facts).items())
    with torch.no_grad():
        editor.hypernet.lambda_exponent.fill_(1.0)
    editor.hypernet.config.lambda_tokens_ref = N[editor.modules[0]] / 2
    assert all(torch.allclose(s, doubled[m], rtol=1e-4, atol=1e-7) for m, s in editor.shifts(facts).items())
    assert not all(torch.allclose(s, base[m], rtol=1e-2) for m, s in doubled.items())


def test_shift_orientation_linear_and_conv1d():
    """After an edit a layer outputs v + S^T k, whatever the weight layout."""
    for model in (tiny.llama(), tiny.gpt2()):
        from malmen.adapters import CausalLMAdapter

        name = CausalLMAdapter(model, tiny.tokenizer()).default_modules(1)[0]
        module = model.get_submodule(name)
        a, b = linear.dims(module)
        k = torch.randn(5, a)
        v = module(k)
        S = torch.randn(a, b)
        with EditHandle(model, {name: S}):
            assert torch.allclose(module(k), v + k @ S, atol=1e-5)
        assert torch.allclose(module(k), v)


def test_default_modules_per_architecture():
    from malmen.adapters import CausalLMAdapter

    llama = CausalLMAdapter(tiny.llama(layers=8), tiny.tokenizer())
    assert llama.default_modules() == [f"model.layers.{i}.mlp.down_proj" for i in range(2, 8)]
    gpt2 = CausalLMAdapter(tiny.gpt2(layers=3), tiny.tokenizer())
    assert gpt2.default_modules() == [f"transformer.h.{i}.mlp.c_proj" for i in range(3)]


def test_bad_module_names_are_refused():
    from malmen.adapters import CausalLMAdapter

    adapter = CausalLMAdapter(tiny.llama(), tiny.tokenizer())
    with pytest.raises(ValueError, match="does not exist"):
        adapter.check_modules(["model.layers.0.mlp.nope"])
    with pytest.raises(ValueError, match="not a linear layer"):
        adapter.check_modules(["model.layers.0.mlp"])


def test_answer_tokens_are_labelled():
    from malmen.adapters import CausalLMAdapter

    tok = tiny.tokenizer()
    adapter = CausalLMAdapter(tiny.llama(), tok)
    batch = adapter.batch(["what is the capital of w1", "who wrote"], ["paris", "alpha beta gamma"])
    ids = tok("alpha beta gamma", add_special_tokens=False)["input_ids"]
    row = batch.targets[1]
    assert row[row != -100].tolist() == ids
    assert batch.mask.sum(1).tolist() == [1, 3]
    # position t predicts token t+1
    t = int(batch.mask[0].nonzero()[0])
    assert int(batch.input_ids[0, t + 1]) == tok("paris", add_special_tokens=False)["input_ids"][0]


def test_save_and_load_roundtrip(tmp_path):
    model, tok = tiny.llama(), tiny.tokenizer()
    editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8, eta_init=0.5)))
    with torch.no_grad():
        for p in editor.hypernet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    editor.save_pretrained(tmp_path / "ed")
    assert sorted(x.name for x in (tmp_path / "ed").iterdir()) == ["editor.json", "editor.safetensors"]
    mode = {x.name: x.stat().st_mode & 0o777 for x in (tmp_path / "ed").iterdir()}
    assert mode["editor.safetensors"] == mode["editor.json"]  # not private: safetensors alone writes 0600
    loaded = MalmenEditor.from_pretrained(tmp_path / "ed", model, tok)
    facts = tiny.facts(5)
    s1, s2 = editor.shifts(facts), loaded.shifts(facts)
    assert all(torch.equal(s1[n], s2[n]) for n in s1)
    other = tiny.llama(seed=1)
    with pytest.raises(ValueError, match="another base model"):
        MalmenEditor.from_pretrained(tmp_path / "ed", other, tok)
    # the same base model in bf16 is recognised
    MalmenEditor.from_pretrained(tmp_path / "ed", tiny.llama(dtype=torch.bfloat16), tok)
    # an editor for other modules (shapes) is refused
    with pytest.raises(ValueError, match="shapes"):
        MalmenEditor.from_pretrained(tmp_path / "ed", tiny.llama(inter=48), tok)


def test_transplanted_editor_keeps_old_shifts_and_edits_new_layers():
    """Each module's shift depends only on its own trace and parameters, so widening an editor
    leaves the old modules' shifts as they were and gives the new ones their source's behaviour."""
    model, tok = tiny.llama(layers=4), tiny.tokenizer()
    editor = MalmenEditor(model, tok, EditorConfig(modules=["model.layers.3.mlp.down_proj"],
                                                   hyper=HyperConfig(rank=4, eta_init=1.0)))
    with torch.no_grad():
        for p in editor.hypernet.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    facts = tiny.facts(6)
    before = editor.shifts(facts)
    wide = editor.transplanted([f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)], eta_factor=0.5)
    assert wide.hypernet is not editor.hypernet and editor.modules == ["model.layers.3.mlp.down_proj"]
    after = wide.shifts(facts)
    assert torch.allclose(after["model.layers.3.mlp.down_proj"], before["model.layers.3.mlp.down_proj"] * 0.5, atol=1e-6)
    assert all(after[f"model.layers.{i}.mlp.down_proj"].abs().sum() > 0 for i in (1, 2))
    assert wide.metadata["transplanted"]["sources"]["model.layers.1.mlp.down_proj"] == "model.layers.3.mlp.down_proj"


def test_pickle_is_refused(tmp_path):
    import pickle

    model, tok = tiny.llama(), tiny.tokenizer()
    MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8))).save_pretrained(tmp_path / "ed")

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "executed"), "w"))

    (tmp_path / "ed" / "editor.safetensors").write_bytes(pickle.dumps({"x": Boom()}))
    with pytest.raises(ValueError, match="safetensors"):
        MalmenEditor.from_pretrained(tmp_path / "ed", model, tok)
    assert not (tmp_path / "executed").exists()


@pytest.mark.parametrize("build,expected", [
    (tiny.gpt2, "transformer.h.{}.mlp.c_proj"),
    (tiny.gptj, "transformer.h.{}.mlp.fc_out"),
    (tiny.neox, "gpt_neox.layers.{}.mlp.dense_4h_to_h"),
])
def test_decoder_families_trace_edit_and_revert(build, expected):
    from malmen.editor import trace

    model, tok = build(), tiny.tokenizer()
    editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8, eta_init=1.0)))
    assert editor.modules == [expected.format(i) for i in range(3)]
    facts = tiny.facts(4)
    batch = editor.adapter.batch([f.prompt for f in facts], [f.target for f in facts])
    keys, grads = trace(editor.adapter, editor.modules, batch)
    for name in editor.modules:
        a, b = linear.dims(model.get_submodule(name))
        assert keys[name].shape == (int(batch.mask.sum()), a) and grads[name].shape == (int(batch.mask.sum()), b)
        assert grads[name].abs().sum() > 0
    before = weights(model)
    handle = editor.edit(facts)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    handle.revert()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_editor_leaves_no_gradients_and_no_changed_flags():
    """A model straight from from_pretrained has trainable parameters; editing, meta-training and
    fine-tuning must leave no .grad on them and every requires_grad flag as the caller set it."""
    from malmen.baselines import FineTuneConfig, FineTuneEditor
    from malmen.train import TrainConfig, Trainer

    model, tok = tiny.llama(), tiny.tokenizer()
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 2 == 0)  # a mix, to see each flag restored as it was
    flags = [p.requires_grad for p in model.parameters()]
    before = weights(model)
    editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8, eta_init=1.0), lm_batch_size=3))
    editor.edit(tiny.facts(5)).revert()
    FineTuneEditor(model, tok, FineTuneConfig(steps=2)).edit(tiny.facts(5)).revert()
    trainer = Trainer(editor, tiny.facts(16, seed=1), tiny.facts(4, seed=2), TrainConfig(n_edits=8, calibrate_eta=False), "/unused")
    trainer.meta_step(trainer.step_facts(0), 0)
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert any(p.grad is not None for p in editor.hypernet.parameters())  # the hyper-network did learn


def test_reverting_edits_out_of_order_is_exact():
    model, tok = tiny.llama(), tiny.tokenizer()
    editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8, eta_init=1.0), lm_batch_size=4))
    base = weights(model)
    h1 = editor.edit(tiny.facts(4, seed=1))
    h2 = editor.edit(tiny.facts(4, seed=2))
    h1.revert()  # the older edit first: the model is the base plus edit 2 alone
    with_h2 = weights(model)
    h2.revert()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    with EditHandle(model, h2.shifts):
        assert all(torch.equal(p, with_h2[n]) for n, p in model.named_parameters())
    # three edits, the middle one out first, then the rest in any order: the base, bitwise
    handles = [editor.edit(tiny.facts(3, seed=s)) for s in (3, 4, 5)]
    for i in (1, 0, 2):
        handles[i].revert()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())


def test_identical_facts_count_once():
    """A thousand copies of a fact edit exactly like one (docs/RELIABILITY.md)."""
    model, tok = tiny.llama(), tiny.tokenizer()
    editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8, eta_init=0.1), lm_batch_size=250))
    fact = tiny.facts(1)[0]
    one, many = editor.shifts([fact]), editor.shifts([fact] * 1000)
    assert all(torch.equal(one[m], many[m]) for m in one) and all(one[m].abs().sum() > 0 for m in one)
    other = tiny.facts(2, seed=9)[1]
    assert all(torch.equal(a, b) for a, b in zip(editor.shifts([fact, other]).values(),
                                                 editor.shifts([fact, other, fact, other]).values()))


@pytest.mark.parametrize("field, value, message", [
    ("aggregation", "mean", "unknown aggregation"),
    ("hyper_precision", "fp8", "hyper_precision must be one of"),
    ("regulariser", "diagonal", "regulariser must be one of"),
    ("prior_mix", 1.5, "prior_mix must lie in"),
    ("lambda_scale", 0.0, "lambda_scale must be positive"),
    ("lambda_scale", -2.0, "lambda_scale must be positive"),
    ("lambda_scale", float("nan"), "lambda_scale must be positive"),
])
def test_a_config_no_editor_can_use_is_refused_by_one_check(field, value, message):
    """EditorConfig.check holds every config-level rule: the constructor, from_method and
    export_editor all refuse through it, so a rule is written once."""
    assert EditorConfig().check() == EditorConfig()  # the defaults pass and it returns the config itself
    with pytest.raises(ValueError, match=message):
        EditorConfig(**{field: value}).check()
    with pytest.raises(ValueError, match=message):
        MalmenEditor(tiny.llama(layers=2), tiny.tokenizer(), EditorConfig(**{field: value}))
