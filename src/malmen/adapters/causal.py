"""Decoder-only LMs (Llama, GPT-2, GPT-J, GPT-NeoX, Mistral, Qwen, ...)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import IGNORE, Adapter, Batch, pad_rows, rows_only


def subject_end(prompt: str, subject: str | None) -> int | None:
    """One past the last character of the last mention of ``subject`` in ``prompt`` (exact, then
    ignoring case), or None."""
    if not subject:
        return None
    at = prompt.rfind(subject)
    if at < 0:
        at = prompt.lower().rfind(subject.lower())
    return at + len(subject) if at >= 0 else None


class CausalLMAdapter(Adapter):
    """Prompt and answer in one sequence; position t predicts token t+1."""

    key_positions = ("answer", "first", "subject")
    predicts_text = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return model.get_output_embeddings() is not None and not getattr(model.config, "is_encoder_decoder", False)

    def lowest_block(self, names: Sequence[str]) -> int:
        """Index of the lowest block holding one of ``names`` (blocks below it are unchanged by
        edits); 0 when a module lies outside the blocks."""
        prefix, blocks = self.blocks()
        indices = []
        for name in names:
            rest = name[len(prefix) + 1:] if name.startswith(prefix + ".") else ""
            head = rest.split(".", 1)[0]
            if not head.isdigit():
                return 0
            indices.append(int(head))
        return min(indices, default=0)

    def trunk(self, names: Sequence[str]):
        """A TrunkCache for the blocks below the lowest of ``names``."""
        from ..replay import TrunkCache

        return TrunkCache(self.blocks()[1], self.lowest_block(names))

    # --- tokenisation
    def encode(self, prompt: str, answer: str, subject: str | None = None) -> tuple[list[int], int, int]:
        """Token ids of ``prompt + ' ' + answer``, the index of the first answer token and the index
        of the subject's last token in the prompt (the last prompt token when ``subject`` is None
        or is not in the prompt: MEMIT's rule, and its fallback).

        No space is added after a prompt that ends in whitespace (a chat template's turn ends in
        a newline).  Works for any tokenizer: with offsets (fast tokenizers) a token belongs to
        the answer when it covers any answer character; otherwise prompt and answer are
        tokenised separately.
        """
        return self.encode_many([prompt], [answer], [subject])[0]

    def encode_many(self, prompts: Sequence[str], answers: Sequence[str],
                    subjects: Sequence[str | None] | None = None) -> list[tuple[list[int], int, int]]:
        """``encode`` of many pairs; a fast tokenizer takes them in one call (a host-side cost that
        a GPU would otherwise wait for)."""
        subjects = subjects or [None] * len(prompts)
        seps = ["" if p[-1:].isspace() else " " for p in prompts]
        ends = [subject_end(p, s) for p, s in zip(prompts, subjects)]  # one past the subject's last character
        tok, out = self.tokenizer, []

        def normalised(ids: list[int], start: int, last: int | None) -> tuple[list[int], int, int]:
            start = max(start, 1)  # the first token is always context
            return ids, start, last if last is not None and last < start else start - 1

        if getattr(tok, "is_fast", False):
            enc = tok([f"{p}{sep}{a}" for p, sep, a in zip(prompts, seps, answers)], return_offsets_mapping=True)
            for ids, offsets, prompt, end in zip(enc["input_ids"], enc["offset_mapping"], prompts, ends):
                boundary = len(prompt)
                start = next((i for i, (s, e) in enumerate(offsets) if e > boundary and e > s), len(ids))
                last = next((i for i, (s, e) in enumerate(offsets) if e >= end and e > s), None) if end else None
                out.append(normalised(ids, start, last))
        else:
            for prompt, sep, answer, end in zip(prompts, seps, answers, ends):
                ids = tok(prompt)["input_ids"]
                last = len(tok(prompt[:end])["input_ids"]) - 1 if end else None
                out.append(normalised(ids + tok(sep + answer, add_special_tokens=False)["input_ids"], len(ids), last))
        return out

    def answer_length(self, prompt: str, answer: str) -> int:
        ids, start, _ = self.encode(prompt, answer)
        return len(ids) - start

    def batch(self, prompts: Sequence[str], answers: Sequence[str],
              subjects: Sequence[str | None] | None = None) -> Batch:
        """Right-padded teacher-forced batch of prompt+answer pairs, truncated from the left;
        with ``subjects``, it also marks each prompt's last subject token."""
        rows, starts, lasts = [], [], []
        for answer, (ids, start, last) in zip(answers, self.encode_many(prompts, answers, subjects)):
            if len(ids) > self.max_length:
                cut = len(ids) - self.max_length
                if cut >= start:
                    raise ValueError(f"answer {answer!r} alone is longer than the model's context ({self.max_length} tokens)")
                ids, start, last = ids[cut:], start - cut, last - cut if last >= cut else start - cut - 1
            rows.append(ids)
            starts.append(start)
            lasts.append(last)
        input_ids, attention = pad_rows(rows, self.pad_id)
        targets = torch.full_like(input_ids, IGNORE)
        for i, (ids, start) in enumerate(zip(rows, starts)):
            n = len(ids)
            # position t predicts token t+1: answer tokens start..n-1 are predicted at start-1..n-2
            targets[i, start - 1 : n - 1] = input_ids[i, start:n]
        subject_mask = None
        if subjects is not None:
            subject_mask = torch.zeros_like(input_ids, dtype=torch.bool)
            subject_mask[torch.arange(len(rows)), torch.tensor(lasts)] = True
        return Batch(input_ids, attention, targets, subject_mask=subject_mask).to(self.device)

    # --- where keys are read
    def key_masks(self, batch: Batch, names: Sequence[str], where: str = "answer") -> torch.Tensor:
        """The answer positions; the one predicting the first answer token ("first"); or the last
        subject token ("subject", batches made with subjects)."""
        if where == "answer":
            return batch.mask
        if where == "first":
            first = batch.mask.int().argmax(1)
            out = torch.zeros_like(batch.mask)
            out[torch.arange(len(batch), device=out.device), first] = True
            return out & batch.mask
        if where == "subject":
            if batch.subject_mask is None:
                raise ValueError("keys at the subject need batches made with subjects")
            return batch.subject_mask
        raise ValueError(f"keys are read at 'answer', 'first' or 'subject' positions, not {where!r}")

    def context_masks(self, batch: Batch, names: Sequence[str]) -> torch.Tensor:
        return batch.attention_mask.bool()

    def key_rows(self, batch: Batch, names: Sequence[str], where: str = "answer") -> torch.Tensor:
        return batch.indexed().answer_rows if where == "answer" else self.key_masks(batch, names, where)

    def context_rows(self, batch: Batch, names: Sequence[str]) -> torch.Tensor:
        return batch.indexed().input_rows

    # --- forward
    def answer_logits(self, batch: Batch) -> torch.Tensor:
        """The model's own logits at the answer positions, its output processing included; the
        output head runs only there (``rows_only``)."""
        with rows_only(self.model.get_output_embeddings(), batch.indexed().answer_rows):
            out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return out.logits.float()

    def text_logprobs(self, texts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """log p(t_i | t_<i) for i >= 1 of each row of ids, right-padded into one forward pass."""
        ids, attention = pad_rows([t.tolist() for t in texts], self.pad_id)
        ids, attention = ids.to(self.device), attention.to(self.device)
        logits = self.model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1]
        keep = attention[:, 1:].bool()
        logits, targets = logits[keep].float(), ids[:, 1:][keep].to(logits.device)
        return torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0], int(keep.sum())

    @torch.no_grad()
    def continuations(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of a batch of prompts (left-padded for generation)."""
        rows = [self.tokenizer(p)["input_ids"][-self.max_length:] for p in prompts]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad_id)
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in out[:, width:]]
