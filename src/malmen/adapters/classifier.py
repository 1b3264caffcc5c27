"""Binary sequence classifiers (fact checking with a BERT-style encoder).

The verdict is one logit z read off the first token; a claim is SUPPORTED when z > 0.  The
adapter presents it to the rest of the package as a two-class 'answer token' with logits
(0, z) at the first position: cross-entropy on that is the logistic loss, its argmax is
``z > 0``, and the KL between two such distributions is the binary KL.  So training, editing
and evaluation run unchanged: ES/GS are ``(z > 0) == flipped label`` on the claim and its
rephrase, LS is agreement with the unedited verdict (DESIGN.md section 5).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import IGNORE, Adapter, Batch

LABELS = ("REFUTES", "SUPPORTS")  # index = the class: 1 when z > 0


def sequence_classification_class(model_type: str) -> str | None:
    """The class name transformers uses for a sequence classifier of this model type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(model_type)


class ClassifierAdapter(Adapter):
    default_n_last = 3

    def __init__(self, model: nn.Module, tokenizer, max_length: int | None = None,
                 labels: Sequence[str] = LABELS):
        super().__init__(model, tokenizer, max_length)
        self.labels = tuple(labels)
        n = getattr(model.config, "num_labels", 1)
        if n not in (1, 2):
            raise ValueError(f"{type(model).__name__} has {n} labels; fact checking needs a binary head (1 or 2 labels)")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ == sequence_classification_class(model.config.model_type)

    def label_index(self, answer: str) -> int:
        key = answer.strip().upper()
        for i, label in enumerate(self.labels):
            if key == label.upper():
                return i
        raise ValueError(f"verdict {answer!r} is not one of {', '.join(self.labels)}")

    def answer_length(self, prompt: str, answer: str) -> int:
        return 1

    def batch(self, prompts: Sequence[str], answers: Sequence[str],
              subjects: Sequence[str | None] | None = None) -> Batch:
        enc = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        targets = torch.full_like(enc["input_ids"], IGNORE)
        targets[:, 0] = torch.tensor([self.label_index(a) for a in answers])
        return Batch(enc["input_ids"], enc["attention_mask"], targets).to(self.device)

    def verdict_logit(self, batch: Batch) -> torch.Tensor:
        logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        return logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0]

    def answer_logits(self, batch: Batch) -> torch.Tensor:
        z = self.verdict_logit(batch)
        return torch.stack([torch.zeros_like(z), z], -1)

    # every token feeds the verdict through attention, so keys are read at all of them
    def key_masks(self, batch: Batch, names: Sequence[str], where: str = "answer") -> torch.Tensor:
        if where != "answer":
            raise ValueError(f"{type(self).__name__} reads keys at its own positions only ('answer'), not {where!r}")
        return batch.attention_mask.bool()

    def context_masks(self, batch: Batch, names: Sequence[str]) -> torch.Tensor:
        return batch.attention_mask.bool()

    @torch.no_grad()
    def continuations(self, prompts: Sequence[str], max_new_tokens: int = 1) -> list[str]:
        """The verdicts, as label names."""
        enc = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        z = self.verdict_logit(Batch(enc["input_ids"], enc["attention_mask"], enc["input_ids"]))
        return [self.labels[int(v > 0)] for v in z]
