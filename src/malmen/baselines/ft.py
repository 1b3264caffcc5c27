"""FT and FT-L: fine-tune the edited layers on the facts themselves.

A shift ``S`` per layer (the same parameterisation as MALMEN's, added to the output as
``S^T k``) is trained with Adam on the teacher-forced loss of the edit prompts for a fixed number
of steps.  FT-L bounds every entry of the weight change by ``linf`` (ROME/MEMIT papers' FT-L).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .. import linear
from ..editor import EditHandle, bucketed, finetune_loss
from ..facts import Fact, distinct
from ..adapters import Adapter, adapter_for
from ..tracing import frozen


@dataclass
class FineTuneConfig:
    modules: list[str] = field(default_factory=list)   # empty: the adapter's default
    steps: int = 10
    lr: float = 5e-3
    linf: float | None = None    # FT-L: bound on every entry of the weight change
    lm_batch_size: int = 32
    replay_trunk: bool = True    # run the blocks below the edited layers once, not once per step


class FineTuneEditor:
    """Fine-tunes a shift of each edited layer on all facts together (no meta-learning)."""

    def __init__(self, model: nn.Module, tokenizer, config: FineTuneConfig | None = None,
                 adapter: Adapter | None = None):
        self.config = config or FineTuneConfig()
        self.adapter = adapter or adapter_for(model, tokenizer)
        self.model = model
        self.config.modules = self.adapter.check_modules(self.config.modules or self.adapter.default_modules())

    @property
    def modules(self) -> list[str]:
        return self.config.modules

    def shifts(self, facts: Iterable[Fact], progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
        facts = list(distinct(facts))
        if not facts:
            raise ValueError("no facts to edit")
        cfg, adapter = self.config, self.adapter
        batches = [adapter.batch([f.prompt for f in g], [f.target for f in g])
                   for g in bucketed(facts, cfg.lm_batch_size, lambda f: len(f.prompt) + len(f.target))]
        shifts = {n: torch.zeros(*linear.dims(self.model.get_submodule(n)), device=adapter.device, requires_grad=True)
                  for n in self.modules}
        optimizer = torch.optim.Adam(shifts.values(), lr=cfg.lr)

        def add_shift(name):
            def hook(module, inputs, output):
                return output + (inputs[0].float() @ shifts[name]).to(output.dtype)
            return hook

        # only the edited layers change, so the blocks below them run once (first step) and are replayed
        trunk = adapter.trunk(self.modules) if cfg.replay_trunk else None
        handles = [self.model.get_submodule(n).register_forward_hook(add_shift(n)) for n in self.modules]
        try:
            with torch.enable_grad(), frozen(self.model):  # gradients for the shifts only
                for _ in range(cfg.steps):
                    optimizer.zero_grad(set_to_none=True)
                    for batch in batches:
                        with trunk.step() if trunk is not None else contextlib.nullcontext():
                            loss = finetune_loss(adapter.answer_logits(batch), batch) / len(facts)
                        loss.backward()
                    optimizer.step()
                    if trunk is not None:
                        trunk.rewind()
                    if cfg.linf is not None:
                        with torch.no_grad():
                            for s in shifts.values():
                                s.clamp_(-cfg.linf, cfg.linf)
        finally:
            for h in handles:
                h.remove()
        if progress:
            progress(len(facts))
        return {n: s.detach() for n, s in shifts.items()}

    def edit(self, facts: Iterable[Fact], progress: Callable[[int], None] | None = None) -> EditHandle:
        return EditHandle(self.model, self.shifts(facts, progress))


def from_method(model: nn.Module, tokenizer, editor: str | None, options: dict, method) -> FineTuneEditor:
    """The factory of the 'ft' and 'ft-l' methods (methods.py).  With ``editor``, the same layers
    as that trained editor; 'ft-l' alone has the ``ft_linf`` option."""
    from ..registry import editor_config

    config = FineTuneConfig(steps=options["ft_steps"], lr=options["ft_lr"], linf=options.get("ft_linf"))
    if editor:
        config.modules = list(editor_config(editor)["config"]["modules"])
    return FineTuneEditor(model, tokenizer, config)
