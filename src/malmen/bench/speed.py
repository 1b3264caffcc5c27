"""``malmen bench speed``: how close editing and meta-training come to the LM's own speed limit.

edit:   facts per second of ``editor.shifts`` (tokenise, trace, hyper-network, sums, solve) against
        the limit, the LM's forward plus backward down to the lowest edited layer on the same,
        already tokenised micro-batches (the one pass an edit cannot avoid).
train:  seconds per meta-training step against its bound, the LM passes the step must make timed
        alone on the same micro-batches: the caching pass (forward + backward to the lowest edited
        layer), the unedited locality forward, and the edited forward + backward on rephrases and
        locality prompts (the trunk below the edits replayed, as the step does).
"""
from __future__ import annotations

import contextlib
import statistics
from typing import Callable, Sequence

import torch

from ..editor import MalmenEditor, bucketed, finetune_loss
from ..facts import Fact
from ..timing import timed
from ..tracing import KeyGradTrace
from ..train import TrainConfig, Trainer


def _lm_pass(editor: MalmenEditor, batch, rows) -> None:
    """Forward, then backward to the lowest edited layer; no weight gradients, nothing kept."""
    with torch.enable_grad(), KeyGradTrace(editor.adapter.model, editor.modules, rows, keep_keys=False):
        finetune_loss(editor.adapter.answer_logits(batch), batch).sum().backward()


def edit_speed(editor: MalmenEditor, facts: Sequence[Fact], repeats: int = 2) -> dict:
    """Best of ``repeats`` for both the edit and its limit (first-call warm-up excluded)."""
    facts = list(facts)
    batches = list(editor.batches(facts))
    editor.shifts(facts[: editor.config.lm_batch_size])  # warm-up
    edit_s, limit_s = [], []
    device = editor.adapter.device
    for _ in range(repeats):
        with timed(device) as edit:
            editor.shifts(facts)
        edit_s.append(edit.seconds)
        with timed(device) as limit:
            for batch in batches:
                _lm_pass(editor, batch, editor.adapter.key_rows(batch, editor.modules, editor.config.keys))
        limit_s.append(limit.seconds)
    edit, limit = len(facts) / min(edit_s), len(facts) / min(limit_s)
    return {"n_facts": len(facts), "edit_facts_per_s": edit, "limit_facts_per_s": limit, "edit_ratio": edit / limit}


def precision_error(editor: MalmenEditor, facts: Sequence[Fact], precision: str, seed: int = 0) -> float:
    """The largest relative difference |S_p - S_fp32| / |S_fp32| over the edited modules of the shifts
    of ``facts`` with the hyper-network's products in ``precision`` against fp32.

    An untrained network's blocks are the identity (V = 0) and would hide any rounding, so the
    blocks' V are given random entries of U's scale for the measurement (then restored)."""
    state = {k: v.clone() for k, v in editor.hypernet.state_dict().items()}
    before = editor.config.hyper_precision
    g = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            for net in editor.hypernet.nets.values():
                for block in net.blocks:
                    if not block.V.any():
                        scale = float(block.U.float().std())
                        block.V.copy_(scale * torch.randn(block.V.shape, generator=g).to(block.V))
        shifts = {}
        for p in ("fp32", precision):
            editor.config.hyper_precision = p
            shifts[p] = editor.shifts(facts)
        return max(float((shifts[precision][m] - shifts["fp32"][m]).norm() / shifts["fp32"][m].norm())
                   for m in shifts["fp32"])
    finally:
        editor.config.hyper_precision = before
        editor.hypernet.load_state_dict(state)


def step_bound(trainer: Trainer, facts: list[Fact], step: int) -> float:
    """Seconds of the LM passes of one meta-training step, timed alone."""
    ed, adapter = trainer.editor, trainer.editor.adapter
    lm_bs = ed.config.lm_batch_size

    def batches(pairs):
        return [adapter.batch(*zip(*g)) for g in bucketed(pairs, lm_bs, lambda p: len(p[0]) + len(p[1]))]

    edit = list(ed.batches(facts))
    gen = batches([(trainer.rephrase(f, step), f.target) for f in facts])
    loc = batches([(f.locality_prompt, f.locality_answer) for f in facts])
    with timed(adapter.device) as took:
        for b in edit:
            _lm_pass(ed, b, adapter.key_rows(b, ed.modules, ed.config.keys))
        trunk = adapter.trunk(ed.modules)
        with torch.no_grad():
            for b in loc:
                with trunk.step():
                    adapter.answer_logits(b)
        trunk.rewind()
        for kind, group in (("gen", gen), ("loc", loc)):
            for b in group:
                with trunk.step() if kind == "loc" else contextlib.nullcontext():
                    _lm_pass(ed, b, adapter.context_rows(b, ed.modules))
    return took.seconds


def train_speed(editor: MalmenEditor, train: Sequence[Fact], n_edits: int, steps: int = 3,
                log: Callable[[str], None] = print, trunk_store: str | None = None, trunk_dtype: str = "fp16") -> dict:
    """Median seconds per meta-training step (after one warm-up step) and the median bound.

    With ``trunk_store``, each timed step's facts are run twice: the first run fills the store with
    their prompts (``train_step_fill_s``: a step of the first epoch), the second replays it
    (``train_step_s``: a step once the prompts have been seen).  The bound stays the LM passes of
    the step without a store."""
    state = {k: v.clone() for k, v in editor.hypernet.state_dict().items()}
    config = TrainConfig(n_edits=n_edits, calibrate_eta=False, trunk_store=trunk_store, trunk_dtype=trunk_dtype)
    trainer = Trainer(editor, train, train[:1] * n_edits, config, "/nonexistent")
    step_s, fill_s, bound_s = [], [], []
    try:
        for step in range(steps + 1):
            facts = trainer.step_facts(step)
            runs = []
            for _ in range(2 if trunk_store else 1):
                with timed(editor.adapter.device) as took:
                    trainer.meta_step(facts, step)
                runs.append(took.seconds)
            bound = step_bound(trainer, facts, step)
            if step > 0:
                step_s.append(runs[-1])
                fill_s.append(runs[0])
                bound_s.append(bound)
            log(f"n={n_edits} step {step}: {' then '.join(f'{r:.2f} s' for r in runs)}, LM passes alone {bound:.2f} s")
    finally:
        editor.hypernet.load_state_dict(state)  # the benchmark leaves the editor as it found it
        editor.hypernet.zero_grad(set_to_none=True)
    step_med, bound_med = statistics.median(step_s), statistics.median(bound_s)
    out = {"n_edits": n_edits, "train_step_s": step_med, "train_step_bound_s": bound_med,
           "train_ratio": step_med / bound_med, "steps": step_s, "bounds": bound_s}
    if trunk_store:
        out.update(train_step_fill_s=statistics.median(fill_s), trunk_store=trunk_store, trunk_dtype=trunk_dtype)
    return out
