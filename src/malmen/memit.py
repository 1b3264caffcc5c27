"""MEMIT (Meng et al., ICLR 2023) and AlphaEdit (Fang et al., ICLR 2025): locate-then-edit batch editors.

For every fact a target hidden state z is found at the last subject token after block L, the
highest edited block: a residual δ added to that block's output is optimised with Adam so that
the edited answer becomes likely (per-fact mean cross-entropy), with MEMIT's KL term keeping the
subject's "essence" (the next-token distributions of "{subject} is a"), weight decay
‖δ‖/‖h‖² and the bound ‖δ‖ <= clamp·‖h‖.  The change z - h is then spread over the edited MLP
output layers, lowest first: at layer l, with the layers below already updated, the keys K
(inputs of the layer at each fact's last subject token, n x in) and the residuals
R = (z - h_L)/(layers left) (n x hidden) give, in linear.py's orientation (output += kᵀS),

    MEMIT:      S = (λ C + KᵀK)⁻¹ KᵀR              C = E[k kᵀ] over ordinary text (keystats.py)
    AlphaEdit:  S = (P KᵀK + μ I)⁻¹ P KᵀR          P = projector on the null space of C

AlphaEdit's S has its rows in C's null space (multiply its equation by I - P), so the outputs of
the keys C was made of do not move.  Facts without a subject use the last prompt token (MEMIT's
rule).  Departures from the papers, for a CPU-sized budget: no random-prefix context templates
(the prompt alone), the essence KL taken at the positions after "{subject}" and "{subject} is",
and the key statistics from text the model samples itself (keystats.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .adapters import Adapter, adapter_for
from .adapters.base import hidden_size, mlp_output
from .editor import EditHandle, finetune_loss, micro_batches
from .facts import Fact, distinct
from .keystats import Corpus, key_moments
from .methods import default
from .replay import TrunkCache
from .tracing import KeyGradTrace, frozen


@dataclass
class MemitConfig:
    layers: list[int] = field(default_factory=list)  # block indices; empty: default_layers()
    projection: str = "none"        # "null": AlphaEdit
    v_steps: int = default("--memit-steps")      # Adam steps on each fact's δ
    v_lr: float = default("--memit-lr")
    v_weight_decay: float = 1e-3
    clamp_norm: float = 4.0         # ‖δ‖ <= clamp_norm · ‖h‖
    kl_factor: float = 0.0625
    mom2_weight: float = default("--memit-lambda")  # λ of MEMIT (GPT-J: 15,000; SmolLM2's: methods.py)
    null_threshold: float = default("--null-threshold")  # AlphaEdit: eigenvalues of C below this span the null space
    l2: float = default("--alpha-l2")              # AlphaEdit: μ
    lm_batch_size: int = 32
    corpus: Corpus = field(default_factory=Corpus)
    cache: str | None = "~/.cache/malmen"


def default_layers(n_blocks: int) -> list[int]:
    """MEMIT's choice scaled to depth: blocks 3-8 of GPT-J's 28 (about 10% to 28% of the stack)."""
    return list(range(round(0.1 * n_blocks), round(0.28 * n_blocks) + 1))


def parse_layers(text: str) -> list[int]:
    """'3-8' or '3,5,7' -> block indices."""
    layers: list[int] = []
    for part in filter(None, text.replace(" ", "").split(",")):
        lo, _, hi = part.partition("-")
        layers.extend(range(int(lo), int(hi or lo) + 1))
    return sorted(set(layers))


class MemitEditor:
    """MEMIT, or AlphaEdit with ``projection='null'``, behind the editors' interface (methods.py)."""

    def __init__(self, model: nn.Module, tokenizer, config: MemitConfig | None = None, adapter: Adapter | None = None,
                 log: Callable[[str], None] | None = None):
        self.config = config or MemitConfig()
        self.adapter = adapter or adapter_for(model, tokenizer)
        self.model, self.log = model, log
        if "subject" not in self.adapter.key_positions:
            raise ValueError(f"MEMIT reads keys at the subject; {type(self.adapter).__name__} does not")
        if self.config.projection not in ("none", "null"):
            raise ValueError(f"projection is 'none' (MEMIT) or 'null' (AlphaEdit), not {self.config.projection!r}")
        prefix, blocks = self.adapter.blocks()
        self.config.layers = sorted(self.config.layers or default_layers(len(blocks)))
        if self.config.layers[0] < 0 or self.config.layers[-1] >= len(blocks):
            raise ValueError(f"layers {self.config.layers} outside the model's {len(blocks)} blocks")
        hidden = hidden_size(model)
        self.modules = [mlp_output(blocks[i], f"{prefix}.{i}", hidden) for i in self.config.layers]
        self.top_block = blocks[self.config.layers[-1]]
        # the corpus's texts fit the model's context
        self.config.corpus = replace(self.config.corpus, length=min(self.config.corpus.length, self.adapter.max_length))
        self.stats_seconds = 0.0
        self.null_dims: dict[str, int] = {}  # AlphaEdit: dimensions of each layer's null space
        self._preserve: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------ what the update preserves
    def preserved(self) -> dict[str, torch.Tensor]:
        """Per module, λC (MEMIT) or the null-space projector P (AlphaEdit), fp64, computed once."""
        if self._preserve is None:
            moments = key_moments(self.model, self.adapter.tokenizer, self.modules, self.config.corpus,
                                  self.config.cache, self.log)
            self.stats_seconds = moments.seconds
            self._preserve = {}
            for name in self.modules:
                c = moments.mean(name).to(self.adapter.device)
                if self.config.projection == "null":
                    values, vectors = torch.linalg.eigh(c)
                    null = vectors[:, values < self.config.null_threshold]
                    if null.shape[1] == 0:
                        raise ValueError(f"{name}: C has no eigenvalue below --null-threshold {self.config.null_threshold:g} "
                                         f"(they lie in {float(values[0]):.3g}..{float(values[-1]):.3g}): AlphaEdit "
                                         "would edit nothing; raise the threshold")
                    self.null_dims[name] = null.shape[1]
                    self._preserve[name] = null @ null.T
                else:
                    self._preserve[name] = self.config.mom2_weight * c
        return self._preserve

    def prepare(self) -> float:
        """The key statistics, computed (or read from the cache) before the first edit; seconds spent."""
        self.preserved()
        return self.stats_seconds

    # ------------------------------------------------------------ targets
    def _batch(self, facts: Sequence[Fact]):
        return self.adapter.batch([f.prompt for f in facts], [f.target for f in facts], [f.subject for f in facts])

    @staticmethod
    def _positions(batch) -> torch.Tensor:
        return batch.subject_mask.int().argmax(1)

    @contextlib.contextmanager
    def _top_output(self, state: dict):
        """Hook on block L: records its output at ``state['pos']`` (``state['h']``) and adds
        ``state['delta']`` there."""
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            state["h"] = hidden[rows, state["pos"]]
            if state.get("delta") is not None:
                hidden = hidden.index_put((rows, state["pos"]), state["h"] + state["delta"].to(hidden.dtype))
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
            return None

        handle = self.top_block.register_forward_hook(hook)
        try:
            yield state
        finally:
            handle.remove()

    def targets(self, facts: Sequence[Fact]) -> torch.Tensor:
        """z for every fact: the hidden state after block L at its last subject token that makes
        its answer likely (n x hidden, fp32)."""
        return torch.cat([self._optimise(group) for group in micro_batches(facts, self.config.lm_batch_size)])

    def _optimise(self, facts: Sequence[Fact]) -> torch.Tensor:
        cfg, adapter = self.config, self.adapter
        main = self._batch(facts)
        subjects = [f.subject or f.prompt for f in facts]
        essence = adapter.batch(subjects, ["is a"] * len(facts), subjects)
        _, blocks = adapter.blocks()
        trunk = TrunkCache(blocks, cfg.layers[-1])  # blocks below L never change here: run them once
        state = {"delta": None}
        with frozen(self.model), self._top_output(state):
            with torch.no_grad():
                state["pos"] = self._positions(essence)
                with trunk.step():
                    reference = torch.log_softmax(adapter.answer_logits(essence), -1)
                state["pos"] = self._positions(main)
                with trunk.step():
                    adapter.answer_logits(main)
                h = state["h"].float()
            trunk.rewind()
            delta = torch.zeros_like(h, requires_grad=True)
            optimizer = torch.optim.Adam([delta], lr=cfg.v_lr)
            h_norm = h.norm(dim=1)
            for _ in range(cfg.v_steps):
                optimizer.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    state["delta"], state["pos"] = delta, self._positions(essence)
                    with trunk.step():
                        logp = torch.log_softmax(adapter.answer_logits(essence), -1)
                    kl = essence.per_fact_sum((reference.exp() * (reference - logp)).sum(-1))
                    state["pos"] = self._positions(main)
                    with trunk.step():
                        nll = finetune_loss(adapter.answer_logits(main), main)
                    decay = (delta.norm(dim=1) / h_norm ** 2).sum()
                    loss = nll + cfg.kl_factor * kl + cfg.v_weight_decay * decay
                loss.backward()
                optimizer.step()
                trunk.rewind()
                with torch.no_grad():
                    scale = (cfg.clamp_norm * h_norm / delta.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
                    delta.mul_(scale[:, None])
                if float(nll.detach()) / len(facts) < 5e-2:  # MEMIT's early stop: the answers are already likely
                    break
        return (h + delta).detach()

    # ------------------------------------------------------------ spreading the update
    def _keys_and_top(self, facts: Sequence[Fact], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys of ``name`` and block L's output, both at each fact's last subject token, at the
        model's current weights."""
        keys, tops = [], []
        state: dict = {"delta": None}
        for group in micro_batches(facts, self.config.lm_batch_size):
            batch = self._batch(group)
            state["pos"] = self._positions(batch)
            with torch.no_grad(), self._top_output(state), \
                    KeyGradTrace(self.model, [name], batch.subject_mask, keep_grads=False) as t:
                self.adapter.answer_logits(batch)
            keys.append(t.keys[name].double())
            tops.append(state["h"].double())
        return torch.cat(keys), torch.cat(tops)

    def solve(self, name: str, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        """The shift S (in x out) of module ``name`` for keys K and residuals R (fp64)."""
        kk, kr = keys.T @ keys, keys.T @ residuals
        preserve = self.preserved()[name]
        if self.config.projection == "null":
            eye = torch.eye(kk.shape[0], dtype=kk.dtype, device=kk.device)
            return torch.linalg.solve(preserve @ kk + self.config.l2 * eye, preserve @ kr)
        return torch.linalg.solve(preserve + kk, kr)

    def shifts(self, facts: Iterable[Fact], progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
        """The shift of every edited layer for all ``facts``; the model is left as it was."""
        facts = list(distinct(facts))
        if not facts:
            raise ValueError("no facts to edit")
        self.preserved()  # statistics first: their time is reported apart (stats_seconds)
        z = self.targets(facts).double()
        shifts: dict[str, torch.Tensor] = {}
        handles: list[EditHandle] = []
        try:
            for i, name in enumerate(self.modules):  # lowest first; each layer sees the ones below updated
                keys, top = self._keys_and_top(facts, name)
                shift = self.solve(name, keys, (z - top) / (len(self.modules) - i))
                shifts[name] = shift.float()
                handles.append(EditHandle(self.model, {name: shifts[name]}))
        finally:
            for handle in reversed(handles):
                handle.revert()
        if progress:
            progress(len(facts))
        return shifts

    def edit(self, facts: Iterable[Fact], progress: Callable[[int], None] | None = None) -> EditHandle:
        """Apply the update for all facts; the handle reverts it exactly."""
        return EditHandle(self.model, self.shifts(facts, progress))


def from_method(model: nn.Module, tokenizer, editor: str | None, options: dict, method) -> MemitEditor:
    """The factory of the 'memit' and 'alphaedit' methods (methods.py)."""
    config = MemitConfig(layers=parse_layers(options["memit_layers"]),
                         projection="null" if method.name == "alphaedit" else "none",
                         v_steps=options["memit_steps"], v_lr=options["memit_lr"],
                         mom2_weight=options["memit_lambda"], null_threshold=options["null_threshold"],
                         l2=options["alpha_l2"], corpus=Corpus(texts=options["stats_texts"]),
                         cache=options["stats_dir"] or None)
    return MemitEditor(model, tokenizer, config)
