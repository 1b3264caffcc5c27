"""A binary claim classifier built on a frozen encoder: the base model for fact-checking edits.

Only the head (the pooler and the verdict logit), optionally with the encoder's biases and
LayerNorms (BitFit), is trained; the encoder's weight matrices stay those of the published
checkpoint.  So the head is all there is to ship (under 1 MB), and an editor
meta-trained on the classifier recognises its base model from the stock encoder weights.

    model, tok = build("minilm-l6")                     # encoder + untrained head
    train_head(model, tok, examples, val_examples)       # [(claim, 'SUPPORTS' | 'REFUTES')]
    save_head(model, "heads/minilm-factcheck", {...})    # head.safetensors + head.json
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from . import io
from .adapters.base import longest_module_list
from .adapters.classifier import ClassifierAdapter
from .formats import HEAD_FILE
from .timing import timed


def build(encoder: str, num_labels: int = 1, head: str | Path | None = None, scope: str = "head"):
    """(classifier, tokenizer): ``encoder`` (alias or directory) with a sequence-classification
    head, random or loaded from a directory written by :func:`save_head`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .models import prepare, resolve

    where, gguf = resolve(encoder)
    if gguf:
        raise ValueError(f"{encoder}: a GGUF file cannot be a classifier's encoder")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # 'newly initialised head' is expected here
    try:
        with torch.random.fork_rng():  # a fixed initial head, without touching the caller's RNG
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_pretrained(where, num_labels=num_labels)
        tokenizer = AutoTokenizer.from_pretrained(where)
    finally:
        hf_logging.set_verbosity(verbosity)
    if head is not None:
        state = io.load_tensors(Path(head) / "head.safetensors")
        expected = {n: tuple(p.shape) for n, p in head_parameters(model, scope).items()}
        if {n: tuple(t.shape) for n, t in state.items()} != expected:
            raise ValueError(f"{head}: this head does not fit the encoder {encoder}")
        model.load_state_dict(state, strict=False)
    model.name_or_path = encoder
    return prepare(model), tokenizer


SCOPES = ("head", "bitfit")


def head_parameters(model: nn.Module, scope: str = "head") -> dict[str, nn.Parameter]:
    """What :func:`train_head` trains.  'head': the parameters outside the embeddings and the
    block stack (pooler, verdict logit).  'bitfit': also every bias and LayerNorm of the encoder
    (BitFit, Ben Zaken et al. 2022): still a small file, and no weight matrix an editor edits or
    fingerprints changes."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    blocks, _ = longest_module_list(model)
    names = {id(m): n for n, m in model.named_modules()}
    embedding = names[id(model.get_input_embeddings())]
    frozen = (blocks + ".", embedding.rsplit(".", 1)[0] + ".")  # the whole embeddings module
    out = {n: p for n, p in model.named_parameters() if not n.startswith(frozen)}
    if scope == "bitfit":
        norms = {f"{n}." for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
        out.update({n: p for n, p in model.named_parameters()
                    if n.startswith(blocks + ".") and (n.endswith(".bias") or any(n.startswith(k) for k in norms))})
    return out


@torch.no_grad()
def accuracy(adapter: ClassifierAdapter, examples: Sequence[tuple[str, str]], batch_size: int = 64) -> float:
    right = 0
    for i in range(0, len(examples), batch_size):
        group = examples[i:i + batch_size]
        verdicts = adapter.continuations([c for c, _ in group])
        right += sum(v == label for v, (_, label) in zip(verdicts, group))
    return right / max(len(examples), 1)


def train_head(model: nn.Module, tokenizer, examples: Sequence[tuple[str, str]],
               val_examples: Sequence[tuple[str, str]], epochs: int = 3, lr: float = 1e-3,
               batch_size: int = 32, seed: int = 0, scope: str = "head",
               log: Callable[[str], None] = print) -> dict:
    """Logistic loss on the verdict, Adam on the ``scope`` parameters only.  Returns accuracies and time."""
    adapter = ClassifierAdapter(model, tokenizer)
    params = head_parameters(model, scope)
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    rng = random.Random(seed)
    order = list(examples)
    with timed(adapter.device) as took:
        before = accuracy(adapter, val_examples)
        try:
            for epoch in range(epochs):
                rng.shuffle(order)
                total = 0.0
                for i in range(0, len(order), batch_size):
                    group = order[i:i + batch_size]
                    batch = adapter.batch([c for c, _ in group], [label for _, label in group])
                    z = adapter.verdict_logit(batch)
                    loss = nn.functional.binary_cross_entropy_with_logits(z, batch.targets[:, 0].float())
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(group)
                log(f"epoch {epoch + 1}: loss {total / len(order):.4f}, validation accuracy {accuracy(adapter, val_examples):.3f}")
        finally:
            for p in params.values():
                p.requires_grad_(False)
        result = {"val_accuracy_before": before, "val_accuracy": accuracy(adapter, val_examples),
                  "train_accuracy": accuracy(adapter, list(examples)[:2000])}
    return {**result, "seconds": took.seconds}


def save_head(model: nn.Module, out: str | Path, info: dict, scope: str = "head") -> None:
    """Write ``head.safetensors`` and ``head.json`` (atomically)."""
    with io.atomic_dir(out, marker=HEAD_FILE) as tmp:
        tensors = {n: p.detach().contiguous() for n, p in head_parameters(model, scope).items()}
        io.save_tensors(tmp / "head.safetensors", tensors)
        (tmp / HEAD_FILE).write_text(json.dumps(info, indent=1) + "\n")
