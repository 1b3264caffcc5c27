"""The same editor on every family: decoder-only (see test_editor), T5 seq2seq, BERT classifier."""
import pytest
import torch

import tiny
from malmen import linear
from malmen.adapters import ClassifierAdapter, Seq2SeqAdapter, adapter_for
from malmen.editor import EditorConfig, MalmenEditor, trace
from malmen.hypernet import HyperConfig
from malmen.train import TrainConfig, Trainer


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_adapter_is_chosen_from_the_model():
    tok = tiny.tokenizer()
    assert type(adapter_for(tiny.t5(), tok)) is Seq2SeqAdapter
    assert type(adapter_for(tiny.bert(), tok)) is ClassifierAdapter
    assert type(adapter_for(tiny.llama(), tok)).__name__ == "CausalLMAdapter"


def test_t5_batches_and_default_modules():
    tok = tiny.tokenizer()
    adapter = Seq2SeqAdapter(tiny.t5(), tok)
    assert adapter.default_modules() == [f"encoder.block.{i}.layer.1.DenseReluDense.wo" for i in range(3)] + \
                                        [f"decoder.block.{i}.layer.2.DenseReluDense.wo" for i in range(3)]
    batch = adapter.batch(["what is the capital of w1", "who wrote"], ["paris", "alpha beta gamma"])
    ids = tok("alpha beta gamma", add_special_tokens=False)["input_ids"]
    assert batch.targets[1].tolist() == ids and batch.mask.sum(1).tolist() == [1, 3]
    # decoder position t is fed answer token t-1 (teacher forcing) and predicts token t
    assert batch.decoder_input_ids[1].tolist() == [0] + ids[:-1]
    assert adapter.answer_logits(batch).shape == (4, len(tok))
    masks = adapter.key_masks(batch, adapter.default_modules())
    assert torch.equal(masks["encoder.block.2.layer.1.DenseReluDense.wo"], batch.attention_mask.bool())
    assert torch.equal(masks["decoder.block.0.layer.2.DenseReluDense.wo"], batch.mask)


def test_classifier_verdicts_are_a_two_class_answer():
    tok = tiny.tokenizer()
    for num_labels in (1, 2):
        adapter = ClassifierAdapter(tiny.bert(num_labels=num_labels), tok)
        assert adapter.default_modules() == [f"bert.encoder.layer.{i}.output.dense" for i in range(3)]
        claims = tiny.claims(5)
        batch = adapter.batch([c.prompt for c in claims], [c.target for c in claims])
        assert batch.mask.sum(1).tolist() == [1] * 5 and bool(batch.mask[:, 0].all())
        logits = adapter.answer_logits(batch)
        z = adapter.verdict_logit(batch)
        assert logits.shape == (5, 2) and torch.equal(logits[:, 1], z) and not logits[:, 0].any()
        # argmax is the verdict z > 0; the loss is the logistic loss of the verdict
        verdicts = adapter.continuations([c.prompt for c in claims])
        assert verdicts == ["SUPPORTS" if v > 0 else "REFUTES" for v in z]
        labels = batch.targets[:, 0].float()
        ce = torch.nn.functional.cross_entropy(logits, batch.targets[:, 0])
        assert torch.allclose(ce, torch.nn.functional.binary_cross_entropy_with_logits(z, labels), atol=1e-6)
    with pytest.raises(ValueError, match="not one of"):
        adapter.batch(["a claim"], ["MAYBE"])


FAMILIES = [
    (tiny.t5, lambda n: tiny.facts(n, seed=5)),
    (tiny.bert, lambda n: tiny.claims(n, seed=5)),
]


@pytest.mark.parametrize("build,make_facts", FAMILIES, ids=["t5", "bert"])
def test_trace_shapes_edit_and_exact_revert(build, make_facts):
    model, tok = build(), tiny.tokenizer()
    editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8, eta_init=1.0)))
    facts = make_facts(4)
    batch = editor.adapter.batch([f.prompt for f in facts], [f.target for f in facts])
    keys, grads = trace(editor.adapter, editor.modules, batch)
    masks = editor.adapter.key_masks(batch, editor.modules)
    for name in editor.modules:
        mask = masks[name] if isinstance(masks, dict) else masks
        a, b = linear.dims(model.get_submodule(name))
        assert keys[name].shape == (int(mask.sum()), a) and grads[name].shape == (int(mask.sum()), b)
        assert grads[name].abs().sum() > 0, name
    before = weights(model)
    handle = editor.edit(facts)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    handle.revert()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("build,make_facts", FAMILIES, ids=["t5", "bert"])
def test_one_meta_step_lowers_the_meta_loss_on_a_fixed_batch(build, make_facts):
    torch.manual_seed(0)
    model, tok = build(), tiny.tokenizer()
    editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8), lm_batch_size=4))
    facts = make_facts(8)
    trainer = Trainer(editor, facts, facts, TrainConfig(n_edits=8, lr=1e-3, scalar_lr=5e-2, calibrate_eta=False), "/tmp/unused")
    hn = editor.hypernet

    def meta_loss():
        state = {k: v.clone() for k, v in hn.state_dict().items()}
        stats = trainer.meta_gradients(facts, step=0)
        hn.load_state_dict(state)
        hn.zero_grad(set_to_none=True)
        return stats["gen_loss"] + trainer.config.c_loc * stats["loc_loss"]

    trainer.meta_gradients(facts, step=0)  # fixes the normaliser's statistics on this batch
    hn.zero_grad(set_to_none=True)
    start = meta_loss()
    trainer.meta_step(facts, 0)
    assert meta_loss() < start


@pytest.mark.parametrize("build,expected", [(tiny.t5, "T5ForConditionalGeneration"),
                                            (tiny.bert, "BertForSequenceClassification"),
                                            (tiny.llama, "LlamaForCausalLM")])
def test_load_model_picks_the_family_from_the_config(tmp_path, build, expected):
    from malmen.models import load_model

    build().save_pretrained(tmp_path / "m")
    tiny.tokenizer().save_pretrained(tmp_path / "m")
    model, _ = load_model(str(tmp_path / "m"))
    assert type(model).__name__ == expected and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("family", ["granite", "cohere", "gemma2"])
def test_answer_logits_are_the_models_own_after_its_output_processing(family):
    """Logit scaling (Granite, Cohere) and final soft-capping (Gemma 2) happen after the head:
    the adapter's logits at the answer positions must equal ``model(...).logits`` there."""
    model, tok = tiny.causal(family), tiny.tokenizer()
    adapter = adapter_for(model, tok)
    batch = adapter.batch(["what is the capital of w1", "who wrote w7 and w9"], ["paris rome", "alpha"])
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.mask]
        ours = adapter.answer_logits(batch)
    assert ours.shape == full.shape
    torch.testing.assert_close(ours, full.float(), rtol=1e-5, atol=1e-5)
    # the processing matters here: the raw head output differs from the model's logits
    hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    assert not torch.allclose(model.get_output_embeddings()(hidden[batch.mask]), full, atol=1e-3)


def test_key_positions_answer_first_and_subject():
    from malmen.adapters import CausalLMAdapter

    tok = tiny.tokenizer()
    adapter = CausalLMAdapter(tiny.llama(), tok)
    prompts, answers = ["what is the capital of w12 and w7", "who wrote w3"], ["paris rome", "alpha beta gamma"]
    batch = adapter.batch(prompts, answers, subjects=["capital of w12", None])
    answer = adapter.key_masks(batch, [], "answer")
    assert answer.sum(1).tolist() == [2, 3] and torch.equal(answer, batch.mask)
    first = adapter.key_masks(batch, [], "first")
    assert first.sum(1).tolist() == [1, 1] and torch.equal(first & answer, first)
    assert first[0].nonzero().item() == answer[0].nonzero()[0].item()  # predicts the first answer token
    subject = adapter.key_masks(batch, [], "subject")
    ids = batch.input_ids
    assert subject.sum(1).tolist() == [1, 1]
    assert ids[0, subject[0]].item() == tok.convert_tokens_to_ids("w12")                      # last subject token
    assert subject[1].nonzero().item() == first[1].nonzero().item()                          # no subject: last prompt token
    assert adapter.batch(["who wrote w3"], ["alpha"], subjects=["w99"]).subject_mask[0].nonzero().item() == 2  # not found
    with pytest.raises(ValueError, match="made with subjects"):
        adapter.key_masks(adapter.batch(prompts, answers), [], "subject")


@pytest.mark.parametrize("keys", ["first", "subject"])
def test_editing_with_keys_at_other_positions_edits_and_reverts(keys):
    import dataclasses

    model, tok = tiny.llama(init=0.3), tiny.tokenizer()
    editor = MalmenEditor(model, tok, EditorConfig(hyper=HyperConfig(rank=8, eta_init=1.0), lm_batch_size=4, keys=keys))
    facts = [dataclasses.replace(f, subject=f.prompt.split()[-1]) for f in tiny.facts(6)]
    before = weights(model)
    seen = []
    real = editor.adapter.key_masks
    editor.adapter.key_masks = lambda b, n, where="answer": seen.append(where) or real(b, n, where)
    handle = editor.edit(facts)
    assert set(seen) == {keys} and all(torch.isfinite(s).all() and s.abs().sum() > 0 for s in handle.shifts.values())
    handle.revert()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="reads keys at"):
        MalmenEditor(tiny.t5(), tok, EditorConfig(keys=keys))
