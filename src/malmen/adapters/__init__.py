"""Per-family adapters.  ``adapter_for`` picks one from the model's config and modules."""
from __future__ import annotations

from torch import nn

from .base import IGNORE, Adapter, Batch
from .causal import CausalLMAdapter
from .classifier import ClassifierAdapter
from .seq2seq import Seq2SeqAdapter

# the first whose ``matches`` holds is used; the decoder-only adapter is the general case
ADAPTERS: list[type[Adapter]] = [Seq2SeqAdapter, ClassifierAdapter, CausalLMAdapter]


def adapter_for(model: nn.Module, tokenizer) -> Adapter:
    """The adapter for ``model``: the first in ``ADAPTERS`` whose ``matches`` holds."""
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls(model, tokenizer)
    raise ValueError(f"no adapter for {type(model).__name__}: malmen edits causal LMs, "
                     "encoder-decoder LMs and binary sequence classifiers")


__all__ = ["ADAPTERS", "Adapter", "Batch", "IGNORE", "adapter_for", "CausalLMAdapter", "ClassifierAdapter", "Seq2SeqAdapter"]
