"""Meta-training the hyper-network (DESIGN.md section 3), with separated backprop.

One step on n facts:
  1. trace keys k_j and value-gradients g_j of the edit prompts (LM frozen, no weight grads);
     update the input normaliser;
  2. hyper-network (no grad) -> d_j -> sufficient statistics -> S* per module;
  3. apply S*; L_meta = L_gen (rephrases) + c_edit * L_edit (the edit prompts themselves; 0 in the
     paper) + c_loc * KL(p_before || p_after) (locality); backprop
     through the LM in micro-batches, keeping only G = dL/dS = sum_t k_t g_t^T per module; revert;
  4. backprop through the solve (M = (A + lambda I)^-1 G), then through the hyper-network chunk by
     chunk; clip; Adam.
The LM never holds the hyper-network's graph and vice versa, so their batch sizes are independent.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from . import distributed, io
from .cache import StepCache
from .editor import EditHandle, MalmenEditor, bucketed, chunks, finetune_loss, trace
from .evaluate import evaluate, peak_rss_mb
from .facts import Fact
from .formats import EDITOR_FILE, EDITOR_WEIGHTS
from .precision import exact_product
from .timing import timed
from .tracing import KeyGradTrace


@dataclass
class TrainConfig:
    """Meta-training settings; saved with every checkpoint, so a run can be reproduced."""

    n_edits: int | list[int] = 64  # facts edited at once per step; a list: the steps cycle through these n (a mix)
    steps: int = 1000
    lr: float = 1e-4             # Adam, hyper-network weights
    scalar_lr: float = 1e-2      # Adam, log-step, log-lambda and its exponent
    c_loc: float = 1.0
    c_edit: float = 0.0          # weight of the edit prompts' own loss in L_meta (0: rephrases only, the paper's)
    first_token_weight: float = 1.0  # the first answer token's weight in each fact's answer loss (1: a plain mean)
    clip: float = 1.0
    val_every: int = 50
    val_n: int = 128             # validation facts edited at once
    seed: int = 0
    max_minutes: float | None = None   # stop (and keep the best checkpoint) after this long
    calibrate_eta: bool = True   # line search for the initial step on the first batch
    cache_dtype: str = "fp32"    # keys and value-gradients of a step: fp32 or bf16 (see cache.py)
    cache_budget_mb: float | None = None  # above this, they are spilled to memory-mapped files
    trunk_store: str | None = None  # directory keeping the hidden states below the edits across steps (trunkstore.py)
    trunk_dtype: str = "fp16"    # their dtype on disk: fp16 or fp32

    @property
    def sizes(self) -> list[int]:
        """The facts edited at once in each step of a cycle (one size unless ``n_edits`` is a mix)."""
        return [self.n_edits] if isinstance(self.n_edits, int) else list(self.n_edits)

    def check(self) -> "TrainConfig":
        """Refuse settings no run can use (ValueError naming the field), before any work."""
        if min(self.sizes) < 1:
            raise ValueError(f"facts per step must be positive, not {self.n_edits}")
        for name in ("lr", "scalar_lr", "c_loc", "c_edit"):
            if not getattr(self, name) >= 0:  # also refuses NaN
                raise ValueError(f"{name} must be zero or positive, not {getattr(self, name)}")
        for name in ("first_token_weight", "clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        for name in ("val_every", "val_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive, not {self.max_minutes}")
        if self.cache_dtype not in ("fp32", "bf16"):
            raise ValueError(f"cache_dtype must be fp32 or bf16, not {self.cache_dtype}")
        if self.trunk_dtype not in ("fp16", "fp32"):
            raise ValueError(f"trunk_dtype must be fp16 or fp32, not {self.trunk_dtype}")
        return self


class Trainer:
    """Meta-trains ``editor.hypernet`` on training facts; keeps ``last`` and ``best`` checkpoints."""

    def __init__(self, editor: MalmenEditor, train: Sequence[Fact], val: Sequence[Fact],
                 config: TrainConfig, out_dir: str | Path, log: Callable[[str], None] = print):
        self.editor, self.config, self.log = editor, config.check(), log
        self.train = [f for f in train if f.rephrases and f.has_locality]
        self.val = [f for f in val if f.rephrases and f.has_locality][: config.val_n]
        if len(self.train) < sum(self.sizes):  # one step of every size fits in an epoch
            raise ValueError(f"need at least {sum(self.sizes)} training facts with rephrases and locality, got {len(self.train)}")
        self.out = Path(out_dir)
        hn = editor.hypernet
        self.optimizer = torch.optim.Adam([
            {"params": hn.network_parameters(), "lr": config.lr},
            {"params": hn.scalar_parameters(), "lr": config.scalar_lr},
        ])
        self.step_index = 0
        self.best = -math.inf
        self.history: list[dict] = []
        self.initialised_from: dict | None = None  # trainer record of the editor this run continues
        # the commands that made the editor, oldest first: an editor continued (init) brings its own;
        # the caller appends this run's (``record``), a resumed run finds its earlier ones in last/
        self.commands: list[str] = list(editor.metadata.get("commands", []))
        self.store = None
        if config.trunk_store:
            from .trunkstore import TrunkStore

            trunk = editor.adapter.trunk(editor.modules)
            self.store = TrunkStore(config.trunk_store, editor.model, trunk.blocks, trunk.upto, config.trunk_dtype)

    @property
    def sizes(self) -> list[int]:
        """The facts edited at once in each step of a cycle (``TrainConfig.sizes``)."""
        return self.config.sizes

    # --- data order: a function of (seed, step) only, so a resumed run sees the same facts
    def step_facts(self, step: int) -> list[Fact]:
        """The facts of ``step``: steps cycle through ``sizes``; an epoch, one shuffle of the
        training facts, holds as many whole cycles as fit in it (the rest waits for a later epoch's
        shuffle), so with one size a step takes the next n facts of the shuffle."""
        sizes, total = self.sizes, len(self.train)
        cycle = sum(sizes)
        epoch, index = divmod(step, (total // cycle) * len(sizes))
        turns, turn = divmod(index, len(sizes))
        start = turns * cycle + sum(sizes[:turn])
        order = list(range(total))
        random.Random(f"{self.config.seed}:{epoch}").shuffle(order)
        return [self.train[i] for i in order[start:start + sizes[turn]]]

    def rephrase(self, fact: Fact, step: int) -> str:
        return random.Random(f"{self.config.seed}:{step}:{fact.prompt}").choice(fact.rephrases)

    # --- one meta-training step
    def meta_step(self, facts: list[Fact], step: int) -> dict:
        """Meta-gradients on ``facts``, then a clipped Adam step."""
        stats = self.meta_gradients(facts, step)
        stats["grad_norm"] = float(nn.utils.clip_grad_norm_(self.editor.hypernet.parameters(), self.config.clip))
        self.optimizer.step()
        return stats

    def meta_gradients(self, facts: list[Fact], step: int) -> dict:
        """Fill ``.grad`` of the hyper-network with dL_meta/dtheta for one batch of facts
        (DESIGN.md section 3, steps 1-4).

        Under torch.distributed this process takes its share of ``facts``; the sums, G and the
        gradients are added over the processes (distributed.py), so every process ends with the
        gradients of the whole batch."""
        n = len(facts)
        facts = list(distributed.shard(facts))
        with StepCache(self.config.cache_dtype, self.config.cache_budget_mb) as cache:
            keys, grads = self.trace_edits(facts, cache)
            if step == 0 and self.config.calibrate_eta and self.step_index == 0 and self.initialised_from is None:
                self.calibrate(facts, keys, grads, n)
            aggregator = self.editor.new_aggregator()
            self.editor.accumulate(aggregator, keys, grads)
            distributed.all_reduce_statistics(aggregator)
            solution = self.editor.solve(aggregator)  # on every process: each needs it for the backward
            G, stats = self.shift_gradients(facts, step, solution.shifts, n)
            distributed.all_reduce(G.values())
            self.backward_through_solve(solution, G, keys, grads, aggregator.counts())
        distributed.all_reduce_grads(self.editor.hypernet.parameters())
        if self.store is not None:
            self.store.flush()
        return {k: distributed.total(v) for k, v in stats.items()}

    def trace_edits(self, facts: list[Fact], cache: StepCache) -> tuple[dict, dict]:
        """Step 1: keys and value-gradients of the edit prompts, kept in ``cache``; the
        hyper-network's input normalisers learn from them (in training only)."""
        ed, hn = self.editor, self.editor.hypernet
        traced = []
        for batch in ed.batches(facts):
            with self.trunk_replay(batch):
                traced.append(trace(ed.adapter, ed.modules, batch, ed.config.keys))
        keys = {name: torch.cat([k[name] for k, _ in traced]) for name in ed.modules}
        grads = {name: torch.cat([g[name] for _, g in traced]) for name in ed.modules}
        del traced
        keys, grads = cache.put(keys, grads)
        device = ed.adapter.device
        for name in ed.modules:  # moments chunk by chunk on the device (the cache may be memory-mapped
            # files), added over the processes, then merged into the running statistics once
            a, b = ed.hypernet.shapes[name]
            moments = [torch.zeros((), dtype=torch.float64, device=device), torch.zeros(a + b, dtype=torch.float64, device=device),
                       torch.zeros(a + b, dtype=torch.float64, device=device)]
            for s in chunks(keys[name].shape[0], ed.config.hyper_batch_size):
                x = torch.cat([keys[name][s].to(device).float(), grads[name][s].to(device).float()], -1).double()
                moments[0] += x.shape[0]
                moments[1] += x.sum(0)
                moments[2] += x.pow(2).sum(0)
            distributed.all_reduce(moments)
            count, total, squares = moments
            mean = total / count.clamp_min(1)  # tensors throughout: no host round-trip per module
            hn.normaliser(name).merge(count, mean, (squares / count.clamp_min(1) - mean.pow(2)).clamp_min(0))
        return keys, grads

    def shift_gradients(self, facts: list[Fact], step: int, shifts: dict[str, torch.Tensor],
                        n: int | None = None) -> tuple[dict, dict]:
        """Step 3: with the shifts applied, L_meta = L_gen (rephrases) + c_edit * L_edit (the edit
        prompts; with ``c_edit`` > 0) + c_loc * KL (locality), backpropagated through the LM in
        micro-batches; only G = dL/dS of each module is kept.  Losses are means over the ``n``
        facts of the step (all processes'; default: these)."""
        ed, cfg = self.editor, self.config
        adapter, modules = ed.adapter, ed.modules

        def batches(pairs):
            return [adapter.batch(*zip(*g)) for g in bucketed(pairs, ed.config.lm_batch_size, lambda p: len(p[0]) + len(p[1]))]

        # (name, micro-batches, weight): the answer losses; locality is the KL below
        answer_terms = [("gen", batches([(self.rephrase(f, step), f.target) for f in facts]), 1.0)]
        if cfg.c_edit:
            answer_terms.append(("edit", list(ed.batches(facts)), cfg.c_edit))  # step 1's micro-batches
        loc_batches = batches([(f.locality_prompt, f.locality_answer) for f in facts])
        # the blocks below the edits run once per locality prompt (twice per step without a store)
        trunk = adapter.trunk(modules)
        before = []
        with torch.no_grad():
            for b in loc_batches:
                with self.trunk_replay(b, trunk):
                    before.append(torch.log_softmax(adapter.answer_logits(b), -1))
        trunk.rewind()
        G = {name: torch.zeros_like(shifts[name]) for name in modules}
        n = n or len(facts)
        losses = {f"{name}_loss": 0.0 for name, _, _ in answer_terms}
        losses["loc_loss"] = 0.0

        def backward(batch, replayed, loss_of) -> None:
            with torch.enable_grad(), replayed, KeyGradTrace(adapter.model, modules, adapter.context_rows(batch, modules)) as t:
                loss_of(adapter.answer_logits(batch)).backward()
            for name in modules:  # exact terms on tensor cores for a half-precision model
                G[name] += exact_product(t.keys[name].t(), t.grads[name])

        def answer_loss(batch, name: str, weight: float):
            def loss_of(logits):
                loss = finetune_loss(logits, batch, cfg.first_token_weight) / n
                losses[f"{name}_loss"] += loss.detach()  # a tensor: no host round-trip per micro-batch
                return weight * loss
            return loss_of

        def locality_loss(batch, before_logp):
            def loss_of(logits):
                logp = torch.log_softmax(logits, -1)
                fact_kl = batch.per_fact_sum((before_logp.exp() * (before_logp - logp)).sum(-1)) / n
                losses["loc_loss"] += fact_kl.detach()
                return cfg.c_loc * fact_kl
            return loss_of

        with EditHandle(adapter.model, shifts):
            for name, group, weight in answer_terms:
                for batch in group:
                    backward(batch, self.trunk_replay(batch), answer_loss(batch, name, weight))
            for batch, before_logp in zip(loc_batches, before):
                backward(batch, self.trunk_replay(batch, trunk), locality_loss(batch, before_logp))
        return G, {k: float(v) for k, v in losses.items()}

    def trunk_replay(self, batch, trunk=None):
        """Where the blocks below the edits get their output: the persistent store when there is
        one; else ``trunk``, this step's record of the same prompts (or nothing: they run)."""
        if self.store is not None:
            return self.store.step(batch.input_ids, batch.attention_mask)
        return trunk.step() if trunk is not None else contextlib.nullcontext()

    def backward_through_solve(self, solution, G: dict, keys: dict, grads: dict, counts: dict) -> None:
        """Step 4: M = (A + lambda I)^-1 G per module (solver.py), then the hyper-network's gradient
        chunk by chunk of cached tokens (its graph never meets the LM's); lambda's (and its
        exponent's) through dL/dlambda at the solve's key ``counts``."""
        ed = self.editor
        self.optimizer.zero_grad(set_to_none=True)
        adjoint = solution.backward(G)
        if distributed.is_main():  # the same on every process: counted once when the gradients are added
            lams = ed.lambdas(counts)
            sum(lams[name] * adjoint.dlam[name].detach() for name in ed.modules).backward()
        for chunk in ed.chunks(keys, grads):
            adjoint.surrogate(chunk).backward()

    @torch.no_grad()
    def calibrate(self, facts: list[Fact], keys: dict, grads: dict, n: int | None = None) -> None:
        """Initial step size: the eta (shared by all modules) that most lowers the edit loss of the
        first batch with the untrained (identity) hyper-network.  Learned from there on.  ``facts``
        are this process's share of the ``n`` facts of the batch."""
        ed, hn = self.editor, self.editor.hypernet
        batches = list(ed.batches(facts))
        n = n or len(facts)

        def edit_loss() -> float:
            return distributed.total(sum(float(finetune_loss(ed.adapter.answer_logits(b), b)) for b in batches)) / n

        base = edit_loss()
        best = (base, float(hn.log_eta[0]))
        for log_eta in [math.log(10.0 ** e) for e in range(-8, 3)]:
            hn.log_eta.fill_(log_eta)
            aggregator = ed.new_aggregator()
            ed.accumulate(aggregator, keys, grads)
            distributed.all_reduce_statistics(aggregator)
            with EditHandle(ed.adapter.model, ed.solve(aggregator).shifts):
                loss = edit_loss()
            if math.isfinite(loss) and loss < best[0]:
                best = (loss, log_eta)
        hn.log_eta.fill_(best[1])
        self.log(f"calibrated eta = {math.exp(best[1]):.3g} (edit loss {base:.3f} -> {best[0]:.3f})")

    # --- validation and checkpoints
    def validate(self) -> dict:
        """Edit the validation facts at once; the score is the mean of ES, GS and LS."""
        result = evaluate(self.editor, self.val, n_edits=len(self.val), generate=False)
        result["score"] = (result["ES"] + result["GS"] + result["LS"]) / 3
        return result

    def save(self, name: str, with_optimizer: bool) -> None:
        """Write the editor (and the Adam state, to resume) to ``out/name``, atomically (rank 0 only)."""
        if not distributed.is_main():
            return
        state = {"step": self.step_index, "best": self.best, "train_config": asdict(self.config),
                 "history": self.history[-200:]}
        if self.initialised_from is not None:
            state["initialised_from"] = self.initialised_from
        files = {}
        if with_optimizer:
            tensors = {}
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            for i, p in enumerate(params):
                for key, value in self.optimizer.state.get(p, {}).items():
                    tensors[f"{i}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
            files["optimizer.safetensors"] = tensors
        self.editor.save_pretrained(self.out / name, extra={"trainer": state, "commands": self.commands},
                                    tensor_files=files)

    def record(self, command: str) -> None:
        """Add ``command`` (this run's, as typed) to the commands saved with every checkpoint."""
        self.commands.append(command)

    def start_from(self, meta: dict) -> None:
        """Continue meta-training an existing editor (its weights are already in ``self.editor``).

        The data order continues at the editor's recorded step, the Adam state starts fresh, the
        step-size line search is skipped and the best checkpoint is chosen anew. The editor's
        earlier trainer record, and its ``provenance``, are kept in the new checkpoints under
        ``initialised_from``.
        """
        state = meta.get("trainer", {})
        self.step_index = int(state.get("step", 0))
        self.initialised_from = {k: v for k, v in state.items() if k != "history"}
        # the loaded editor's provenance tells how *it* was made; saved at the top level it would be
        # read as this run's (a shipped editor once carried its parent's this way)
        if "provenance" in self.editor.metadata:
            self.initialised_from["provenance"] = self.editor.metadata.pop("provenance")
        self.log(f"starting from an editor trained for {self.step_index} steps")

    def resume(self) -> bool:
        """Continue from ``out/last`` if it exists. Returns whether it did."""
        last = self.out / "last"
        if not (last / EDITOR_FILE).is_file():
            return False
        meta = MalmenEditor.read_config(last)
        # the running editor keeps its optimizer's parameters: loaded in place, not rebuilt
        self.editor.hypernet.load_file(last / EDITOR_WEIGHTS, what="this run's editor (its modules and rank)")
        state = meta["trainer"]
        self.step_index, self.best, self.history = state["step"], state["best"], state["history"]
        self.initialised_from = state.get("initialised_from")
        self.commands = list(meta.get("commands", []))
        opt = last / "optimizer.safetensors"
        if opt.is_file():
            tensors = io.load_tensors(opt)
            state: dict[int, dict] = {}
            for key, value in tensors.items():
                index, name = key.split(".", 1)
                state.setdefault(int(index), {})[name] = value
            # load_state_dict moves every state tensor onto its parameter's device (and keeps
            # Adam's step counters where Adam wants them)
            self.optimizer.load_state_dict({"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]})
        self.log(f"resumed from {last} at step {self.step_index}")
        return True

    def fit(self, progress: Callable[[int, dict], None] | None = None) -> dict:
        """Train until ``steps`` or ``max_minutes``, validating every ``val_every`` steps."""
        cfg = self.config
        start = time.monotonic()  # a budget of wall-clock time, not a measurement
        while self.step_index < cfg.steps:
            facts = self.step_facts(self.step_index)
            with timed(self.editor.adapter.device) as took:
                stats = self.meta_step(facts, self.step_index)
            self.step_index += 1
            stats.update(step=self.step_index, n_edits=len(facts), seconds=took.seconds, peak_rss_mb=peak_rss_mb())
            out_of_time = cfg.max_minutes is not None and time.monotonic() - start > 60 * cfg.max_minutes
            if self.step_index % cfg.val_every == 0 or self.step_index == cfg.steps or out_of_time:
                val = self.validate()
                stats.update({f"val_{k}": val[k] for k in ("ES", "GS", "LS", "score")})
                if val["score"] > self.best:
                    self.best = val["score"]
                    self.save("best", with_optimizer=False)
                self.history.append(stats)
                self.save("last", with_optimizer=True)
            else:
                self.history.append(stats)
            if progress:
                progress(self.step_index, stats)
            if out_of_time:
                self.log(f"stopping after {cfg.max_minutes} minutes at step {self.step_index}")
                break
        return {"steps": self.step_index, "best_score": self.best, "history": self.history}
