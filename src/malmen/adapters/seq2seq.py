"""Encoder-decoder LMs (T5 family): the prompt goes to the encoder, the answer to the decoder.

Edited layers may sit in either stack.  An encoder layer sees the source tokens, so its keys and
value-gradients are read at every real source token; a decoder layer's are read at the answer
positions, as in a decoder-only LM.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import IGNORE, Adapter, Batch, hidden_size, longest_module_list, mlp_output, pad_rows


class Seq2SeqAdapter(Adapter):
    default_n_last = 3  # per stack: the last 3 encoder and the last 3 decoder blocks

    def __init__(self, model: nn.Module, tokenizer, max_length: int | None = None):
        super().__init__(model, tokenizer, max_length)
        start = getattr(model.config, "decoder_start_token_id", None)
        self.start_id = self.pad_id if start is None else start
        names = {id(m): n for n, m in model.named_modules()}
        self.stacks: dict[str, tuple[str, nn.ModuleList]] = {}  # side -> (blocks' name, blocks)
        self.encoder_name = names[id(model.get_encoder())]
        for side, stack in (("encoder", model.get_encoder()), ("decoder", model.get_decoder())):
            rel, blocks = longest_module_list(stack)
            self.stacks[side] = (f"{names[id(stack)]}.{rel}", blocks)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return bool(getattr(model.config, "is_encoder_decoder", False))

    def side(self, name: str) -> str:
        """'encoder' or 'decoder': the stack a module belongs to."""
        return "encoder" if name.startswith(self.encoder_name + ".") else "decoder"

    def default_modules(self, n_last: int | None = None) -> list[str]:
        hidden, out = hidden_size(self.model), []
        for prefix, blocks in self.stacks.values():
            n = min(n_last or self.default_n_last, len(blocks))
            out += [mlp_output(blocks[i], f"{prefix}.{i}", hidden) for i in range(len(blocks) - n, len(blocks))]
        return out

    def _answer_ids(self, answer: str) -> list[int]:
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"answer {answer!r} has no tokens")
        return ids

    def answer_length(self, prompt: str, answer: str) -> int:
        return len(self._answer_ids(answer))

    def batch(self, prompts: Sequence[str], answers: Sequence[str],
              subjects: Sequence[str | None] | None = None) -> Batch:
        sources = [self.tokenizer(p)["input_ids"][-self.max_length:] for p in prompts]
        answer_ids = [self._answer_ids(a)[: self.max_length] for a in answers]
        input_ids, attention = pad_rows(sources, self.pad_id)
        decoder_ids, decoder_mask = pad_rows([[self.start_id] + a[:-1] for a in answer_ids], self.pad_id)
        targets, _ = pad_rows(answer_ids, IGNORE)  # decoder position t predicts answer token t
        return Batch(input_ids, attention, targets, decoder_ids, decoder_mask).to(self.device)

    def _per_module(self, names: Sequence[str], encoder: torch.Tensor, decoder: torch.Tensor) -> dict:
        return {name: encoder if self.side(name) == "encoder" else decoder for name in names}

    def key_masks(self, batch: Batch, names: Sequence[str], where: str = "answer") -> dict:
        if where != "answer":
            raise ValueError(f"{type(self).__name__} reads keys at its own positions only ('answer'), not {where!r}")
        return self._per_module(names, batch.attention_mask.bool(), batch.mask)

    def context_masks(self, batch: Batch, names: Sequence[str]) -> dict:
        return self._per_module(names, batch.attention_mask.bool(), batch.decoder_attention_mask.bool())

    def answer_logits(self, batch: Batch) -> torch.Tensor:
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         decoder_input_ids=batch.decoder_input_ids,
                         decoder_attention_mask=batch.decoder_attention_mask, use_cache=False)
        return out.logits[batch.mask].float()

    @torch.no_grad()
    def continuations(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        sources = [self.tokenizer(p)["input_ids"][-self.max_length:] for p in prompts]
        ids, mask = pad_rows(sources, self.pad_id)
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  max_new_tokens=max_new_tokens, do_sample=False)
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in out]
