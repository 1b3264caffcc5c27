"""The claim classifier: only its head is trained, it reloads by directory, and editors accept it."""
import random

import pytest
import torch

import tiny
from malmen.classifier import build, head_parameters, save_head, train_head
from malmen.models import load_model


def claims(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        city = rng.choice(["paris", "rome"])
        out.append((f"the capital of w{rng.randrange(200)} is {city}", "SUPPORTS" if city == "paris" else "REFUTES"))
    return out


@pytest.mark.parametrize("scope", ["head", "bitfit"])
def test_head_training_leaves_the_encoder_weights_alone_and_reloads(tmp_path, scope):
    tiny.write_encoder(tmp_path / "enc")
    model, tok = build(str(tmp_path / "enc"))
    head = head_parameters(model, scope)
    if scope == "head":
        assert head and all(n.startswith(("bert.pooler.", "classifier.")) for n in head)
    else:
        assert "bert.encoder.layer.1.output.dense.bias" in head and "bert.encoder.layer.0.output.LayerNorm.weight" in head
        assert not any(n.endswith("dense.weight") and n.startswith("bert.encoder") for n in head)
    encoder_before = {n: p.clone() for n, p in model.named_parameters() if n not in head}
    stats = train_head(model, tok, claims(256, 0), claims(64, 1), epochs=15, lr=1e-2, scope=scope, log=lambda m: None)
    assert stats["val_accuracy"] >= 0.9 and stats["val_accuracy"] > stats["val_accuracy_before"], stats
    assert all(torch.equal(p, encoder_before[n]) for n, p in model.named_parameters() if n not in head)
    assert not any(p.requires_grad for p in model.parameters())

    save_head(model, tmp_path / "head", {"encoder": str(tmp_path / "enc"), "scope": scope}, scope=scope)
    loaded, _ = load_model(str(tmp_path / "head"))
    batch = tok(["the capital of w3 is rome"], return_tensors="pt")
    assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    assert type(loaded).__name__ == "BertForSequenceClassification"
