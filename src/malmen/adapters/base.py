"""What every adapter shares: the batch record, module checks and finding the edited layers.

An adapter is the one place that knows how a model family is fed: how (prompt, answer) pairs
become teacher-forced batches, where keys are read, how logits at the answer positions are
computed and which linear layers are edited by default.  Decisions come from the model's
modules and config, never its name.  Everything downstream (tracing, editor, training,
evaluation) sees only ``Batch`` and the methods of ``Adapter``.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from .. import linear

IGNORE = -100


@dataclass
class Batch:
    """A teacher-forced batch.

    ``targets`` is aligned with the sequence whose positions predict the answer (the decoder's in
    a seq2seq model): ``targets[b, t]`` is what position t must predict where that belongs to the
    answer, else IGNORE.  ``mask`` marks those positions, the 'answer positions'.

    ``to(device)`` also works out, on the host and before anything moves, where the answer
    positions are (``answer_rows``, ``answer_weights``) and where the input is real
    (``input_rows``): selecting by these indices needs no synchronisation with a GPU, where
    selecting by a boolean mask stops the host until the GPU catches up, once per selection.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    decoder_input_ids: torch.Tensor | None = None
    decoder_attention_mask: torch.Tensor | None = None
    subject_mask: torch.Tensor | None = None   # the last subject token of each prompt (when asked for)
    answer_rows: torch.Tensor | None = None    # flat (row-major) indices of the answer positions
    answer_weights: torch.Tensor | None = None  # per answer position: 1 / its fact's answer positions
    input_rows: torch.Tensor | None = None     # flat indices of the real (attended) input positions

    @property
    def mask(self) -> torch.Tensor:
        return self.targets != IGNORE

    def indexed(self) -> "Batch":
        """This batch with its index fields filled (where they are still missing)."""
        found = {}
        if self.answer_rows is None or self.answer_weights is None:
            mask = self.mask
            counts = mask.sum(1)
            found["answer_rows"] = mask.reshape(-1).nonzero().squeeze(1)
            found["answer_weights"] = (1.0 / counts.clamp_min(1).float()).repeat_interleave(counts)
        if self.input_rows is None:
            found["input_rows"] = self.attention_mask.reshape(-1).nonzero().squeeze(1)
        return dataclasses.replace(self, **found) if found else self

    def to(self, device) -> "Batch":
        """On ``device``, indexed first; from the host through pinned memory, without a
        synchronisation (a copy from pageable memory waits for the GPU)."""
        device = torch.device(device)
        indexed = self.indexed()
        moved = {f.name: _moved(getattr(indexed, f.name), device) for f in dataclasses.fields(self)}
        return Batch(**moved)

    def per_fact_sum(self, token_values: torch.Tensor, first: float = 1.0) -> torch.Tensor:
        """Sum over facts of the mean of each fact's ``token_values`` (one per answer position);
        ``first``: the weight of each fact's first answer position against 1 for the others in that
        mean (1: the plain mean)."""
        weights = self.indexed().answer_weights
        if first != 1.0:  # sizes known on the host: no synchronisation with a GPU
            counts, n = self.mask.sum(1), weights.shape[0]
            starts = (counts.cumsum(0) - counts).repeat_interleave(counts, output_size=n)  # in answer_rows order
            is_first = torch.arange(n, device=counts.device) == starts
            per_fact = (counts + first - 1.0).repeat_interleave(counts, output_size=n)  # each fact's total weight
            weights = torch.where(is_first, first, 1.0) / per_fact
        return (token_values * weights.to(token_values.device)).sum()

    def answer_targets(self) -> torch.Tensor:
        """The target token of every answer position, in ``answer_rows`` order."""
        return self.targets.reshape(-1).index_select(0, self.indexed().answer_rows)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def _moved(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if t is None or t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def pad_rows(rows: Sequence[Sequence[int]], value: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad lists of ids into (ids, attention mask)."""
    width = width or max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)
    return ids, mask


@contextmanager
def rows_only(head: nn.Module, rows: torch.Tensor) -> Iterator[None]:
    """Feed ``head`` only the positions ``rows`` (flat indices into batch x seq, ``Batch.answer_rows``)
    while the model runs its own forward.

    The output head is a large share of a small LM's cost, and only the answer positions need
    it.  Everything a model does after its head (Granite's logit scaling, Cohere's logit scale,
    Gemma 2's final soft-capping) is elementwise, so it runs unchanged on the selected rows and
    the logits are exactly the model's own there.
    """
    def select(module, args):
        hidden = args[0]  # on a model spread over devices, the previous block's device
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.to(hidden.device)),) + tuple(args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def longest_module_list(root: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of blocks under ``root``: its longest ModuleList (name relative to ``root``)."""
    best = max(((n, m) for n, m in root.named_modules() if isinstance(m, nn.ModuleList)),
               key=lambda nm: len(nm[1]), default=None)
    if best is None:
        raise ValueError(f"cannot find the blocks of {type(root).__name__} (no nn.ModuleList)")
    return best


def hidden_size(model: nn.Module) -> int:
    return model.get_input_embeddings().embedding_dim


def mlp_output(block: nn.Module, prefix: str, hidden: int) -> str:
    """The MLP output projection of a block: its last linear that maps a wider input back to the
    hidden size (Llama ``mlp.down_proj``, GPT-2 ``mlp.c_proj``, GPT-J ``mlp.fc_out``, NeoX
    ``mlp.dense_4h_to_h``, T5 ``DenseReluDense.wo``, BERT ``output.dense``)."""
    candidates = []
    for name, module in block.named_modules():
        if linear.is_editable(module):
            a, b = linear.dims(module)
            if a > b == hidden:
                candidates.append(name)
    if not candidates:
        raise ValueError(f"{prefix}: no MLP output linear found; pass module names explicitly")
    return f"{prefix}.{candidates[-1]}"


class Adapter:
    """Base of the per-family adapters; subclasses implement the feeding of the model."""

    default_n_last = 6  # blocks whose MLP output is edited by default
    key_positions: tuple[str, ...] = ("answer",)  # where keys can be read (``key_masks``)
    predicts_text = False  # whether ``text_logprobs`` serves (perplexity.py): a causal LM's

    def __init__(self, model: nn.Module, tokenizer, max_length: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        config = model.config
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.max_length = max_length or limit or 2048
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = pad
        self._blocks: tuple[str, nn.ModuleList] | None = None

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter feeds ``model`` (decided from its config and modules)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def check_modules(self, names: Sequence[str]) -> list[str]:
        """Validate module names: they must exist and be linear layers."""
        out = []
        for name in names:
            try:
                module = self.model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"module '{name}' does not exist in {type(self.model).__name__}") from None
            if not linear.is_editable(module):
                raise ValueError(f"module '{name}' is a {type(module).__name__}, not a linear layer")
            if module.weight.device.type == "meta":
                raise ValueError(f"module '{name}' has no weights in memory (a device map offloaded it to the CPU or "
                                 "disk); an edited module needs a device of its own: give the map more GPU memory")
            out.append(name)
        if not out:
            raise ValueError("no modules to edit")
        return out

    def blocks(self) -> tuple[str, nn.ModuleList]:
        """The stack of transformer blocks: the longest ModuleList in the model (found once)."""
        if self._blocks is None:
            self._blocks = longest_module_list(self.model)
        return self._blocks

    def default_modules(self, n_last: int | None = None) -> list[str]:
        """The MLP output linear of each of the last ``n_last`` blocks."""
        prefix, blocks = self.blocks()
        n = min(n_last or self.default_n_last, len(blocks))
        hidden = hidden_size(self.model)
        return [mlp_output(blocks[i], f"{prefix}.{i}", hidden) for i in range(len(blocks) - n, len(blocks))]

    def trunk(self, names: Sequence[str]):
        """A TrunkCache for the blocks below the edits (one that replays nothing by default)."""
        from ..replay import TrunkCache

        return TrunkCache(nn.ModuleList(), 0)

    # --- feeding; see CausalLMAdapter for the reference behaviour
    def batch(self, prompts: Sequence[str], answers: Sequence[str],
              subjects: Sequence[str | None] | None = None) -> Batch:
        """Teacher-forced batch; ``subjects`` only matter where keys are read at the subject."""
        raise NotImplementedError

    def answer_logits(self, batch: Batch) -> torch.Tensor:
        """Logits at the answer positions, (n_answer_positions x classes), fp32, in mask order."""
        raise NotImplementedError

    def key_masks(self, batch: Batch, names: Sequence[str], where: str = "answer") -> torch.Tensor | dict:
        """Positions whose keys and value-gradients an edit uses (one mask, or one per module):
        ``where`` is one of ``key_positions``."""
        raise NotImplementedError

    def context_masks(self, batch: Batch, names: Sequence[str]) -> torch.Tensor | dict:
        """Every real position of the sequence each module sees (its weight gradient sums over them)."""
        raise NotImplementedError

    def key_rows(self, batch: Batch, names: Sequence[str], where: str = "answer") -> torch.Tensor | dict:
        """``key_masks`` for ``KeyGradTrace``: as flat row indices where the batch knows them (no GPU
        synchronisation), else the masks themselves."""
        return self.key_masks(batch, names, where)

    def context_rows(self, batch: Batch, names: Sequence[str]) -> torch.Tensor | dict:
        """``context_masks`` for ``KeyGradTrace``, as ``key_rows``."""
        return self.context_masks(batch, names)

    def text_logprobs(self, texts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Log-probabilities of every token of ``texts`` (token id rows) but the first, given the
        tokens before it, and how many there are (perplexity.py).  Only a model that predicts
        text has them."""
        raise ValueError(self.refusal_of_text())

    def refusal_of_text(self) -> str:
        """Why this adapter's model has no perplexity (``predicts_text`` False)."""
        return f"perplexity needs a model that predicts text (a causal LM), not {type(self.model).__name__}"

    def chat_prompt(self, question: str) -> str | None:
        """``question`` as a user's turn in the tokenizer's chat template, ready for the answer
        (None when the tokenizer has no template): how people ask an instruct model."""
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        return self.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                  add_generation_prompt=True)

    def answer_length(self, prompt: str, answer: str) -> int:
        """Number of answer positions of the pair (how many tokens to generate)."""
        raise NotImplementedError

    def continuations(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """The model's greedy answers to the prompts, as text."""
        raise NotImplementedError
