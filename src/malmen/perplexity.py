"""Perplexity of ordinary text before and after an edit: what the edit costs the model beyond the
locality prompts (``malmen eval --ppl-text``).

The text is cut into windows of at most ``window`` tokens (no overlap, no special tokens added), at
most ``limit`` tokens in all; each window's first token is context only.  Perplexity is
exp(summed negative log-likelihood / predicted tokens) over all windows, so every token counts once
whatever window it falls in.  Only models that predict text (``Adapter.text_logprobs``: causal LMs)
have one.  torch is imported where it is used: the command line reads the file and its limits
before it loads anything heavy.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .adapters import Adapter

WINDOW = 512     # tokens per window: the model's whole context is not needed to measure drift
LIMIT = 8192     # tokens in all: about ten seconds of forward passes for SmolLM2-135M on two CPU cores


def read_text(path: str | Path) -> str:
    """The text of a UTF-8 file; ValueError naming the file when it cannot be read or holds no text."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot be read as UTF-8 text ({err.__class__.__name__})") from None
    if not text.strip():
        raise ValueError(f"{path}: holds no text")
    return text


def windows(tokenizer, text: str, window: int = WINDOW, limit: int = LIMIT) -> list[torch.Tensor]:
    """The text's token ids, the first ``limit``, cut into windows of ``window`` (a last, shorter one
    kept when it predicts at least one token)."""
    import torch

    if window < 2 or limit < 2:
        raise ValueError("a perplexity window and its limit need at least two tokens")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:limit], dtype=torch.long)
    cuts = [ids[i:i + window] for i in range(0, len(ids), window)]
    cuts = [c for c in cuts if len(c) >= 2]
    if not cuts:
        raise ValueError("the text is shorter than two tokens")
    return cuts


def perplexity(adapter: Adapter, texts: list[torch.Tensor], batch_size: int = 2) -> float:
    """exp(mean negative log-likelihood) of every predicted token of ``texts`` (``windows``); a few
    windows per forward pass, since their logits over the whole vocabulary are held at once."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            logprobs, targets = adapter.text_logprobs(texts[start:start + batch_size])
            nll -= float(logprobs.sum(dtype=torch.float64))
            count += targets
    return math.exp(nll / count)
