"""Editing: trace facts, run the hyper-network, aggregate, apply one shift; revert exactly.

    editor = MalmenEditor.from_pretrained("runs/zsre/best", model, tokenizer)
    handle = editor.edit(facts)          # one aggregated update for all facts
    ...
    handle.revert()                      # bitwise the original weights

Methods differ only in their aggregation (``solver.AGGREGATIONS``): 'malmen' (normal equation
per module), 'joint' (one normal equation over all modules' keys) or 'sum' (MEND).  Everything
else is shared.
"""
from __future__ import annotations

import os
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from . import distributed, io, linear, registry
from .adapters import Adapter, Batch, adapter_for
from .facts import Fact, distinct
from .formats import EDITOR_FILE, EDITOR_PRIOR, EDITOR_WEIGHTS
from .hypernet import HyperConfig, HyperNetwork, nearest_sources, shapes_of
from .keystats import Corpus, flat_prior, nested_prior
from .methods import REGULARISERS
from .models import model_identity, same_weights, weight_sample
from .precision import PRECISIONS
from .regulariser import ShapedRegulariser
from .solver import AGGREGATIONS, Tokens
from .solver import report as solver_report
from .tracing import KeyGradTrace

FORMAT = registry.FORMAT
VERSION = 1


@dataclass
class EditorConfig:
    """What an editor edits and how; saved in editor.json beside the weights."""

    modules: list[str] = field(default_factory=list)   # empty: the adapter's default
    aggregation: str = "malmen"                         # 'malmen', 'joint' or 'sum' (MEND)
    hyper: HyperConfig = field(default_factory=HyperConfig)
    lm_batch_size: int = 32                             # facts per LM micro-batch
    hyper_batch_size: int = 4096                        # tokens per hyper-network chunk
    keys: str = "answer"                                # where keys are read: answer, first or subject (adapters)
    lambda_scale: float = 1.0                           # edit-time factor on the learned regularisers
    regulariser: str = "identity"                       # lambda times: identity (the paper) or keys (E[k kᵀ], keystats.py)
    prior_mix: float = 1.0                              # keys: the weight of E[k kᵀ] against the identity
    hyper_precision: str = "tf32"                       # the hyper-network's products: fp32, tf32 (CUDA) or bf16

    def check(self) -> "EditorConfig":
        """Refuse settings no editor can use (ValueError naming the field); returns itself.  Called
        where a config is built or changed: the editor's constructor, ``from_method`` after the
        method's options, ``export_editor`` before it writes.  What depends on the model (the
        adapter's key positions, the modules' shapes) is checked by the editor."""
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}; choose from {', '.join(AGGREGATIONS)}")
        if self.hyper_precision not in PRECISIONS:
            raise ValueError(f"hyper_precision must be one of {', '.join(PRECISIONS)}, not {self.hyper_precision!r}")
        if self.regulariser not in REGULARISERS:
            raise ValueError(f"regulariser must be one of {', '.join(REGULARISERS)}, not {self.regulariser!r}")
        if not 0.0 <= self.prior_mix <= 1.0:
            raise ValueError(f"prior_mix must lie in [0, 1], not {self.prior_mix}")
        if not self.lambda_scale > 0.0:  # also refuses NaN
            raise ValueError(f"lambda_scale must be positive, not {self.lambda_scale}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EditorConfig":
        d = dict(d)
        d["hyper"] = HyperConfig(**d.get("hyper", {}))
        return cls(**d)


# ---------------------------------------------------------------- tracing facts

def finetune_loss(logits: torch.Tensor, batch: Batch, first: float = 1.0) -> torch.Tensor:
    """Sum over facts of each fact's mean cross-entropy on its answer tokens (``first``: the first
    answer token's weight in that mean, Batch.per_fact_sum).

    Per-fact means make a fact's value-gradient independent of the batch it is traced in.
    """
    # the targets move to the logits: on a model spread over devices the head sits on the last one
    token_loss = nn.functional.cross_entropy(logits, batch.answer_targets().to(logits.device), reduction="none")
    return batch.per_fact_sum(token_loss, first)


def trace(adapter: Adapter, modules: Sequence[str], batch: Batch, where: str = "answer") -> tuple[dict, dict]:
    """Keys and value-gradients of one teacher-forced batch, at the key positions ``where``
    (``Adapter.key_masks``: every answer token by default)."""
    with torch.enable_grad(), KeyGradTrace(adapter.model, modules, adapter.key_rows(batch, modules, where)) as t:
        loss = finetune_loss(adapter.answer_logits(batch), batch)
        loss.backward()
    return t.keys, t.grads


def micro_batches(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def bucketed(items: Iterable, size: int, length: Callable, window: int = 32) -> Iterator[list]:
    """Micro-batches of ``size`` items of similar ``length`` (less padding), sorting within windows
    of ``window`` micro-batches so that streams stay streams."""
    for block in micro_batches(items, size * window):
        yield from micro_batches(sorted(block, key=length), size)


def fact_batches(adapter: Adapter, facts: Iterable[Fact], size: int, where: str = "answer",
                 prompt: Callable[[Fact], str] = lambda f: f.prompt) -> Iterator[tuple[Batch, list[Fact]]]:
    """Teacher-forced micro-batches of ``facts`` grouped by length (``bucketed``), each with its
    facts in row order; subjects are marked when keys are read at the subject (``where``).
    Deterministic, so that a patch's facts are traced again in the batches it was made in."""
    for group in bucketed(facts, size, lambda f: len(prompt(f)) + len(f.target)):
        subjects = [f.subject for f in group] if where == "subject" else None
        yield adapter.batch([prompt(f) for f in group], [f.target for f in group], subjects), group


class TokenBuffer:
    """Traced micro-batches gathered until the hyper-network has a full chunk to work on: a few
    large products instead of many small ones (on a GPU, the host's launches are the bottleneck)."""

    def __init__(self, modules: Sequence[str]):
        self.modules = list(modules)
        self.keys: dict[str, list] = {m: [] for m in self.modules}
        self.grads: dict[str, list] = {m: [] for m in self.modules}
        self.tokens = 0  # of the module that sees the most

    def add(self, keys: dict, grads: dict) -> None:
        for m in self.modules:
            self.keys[m].append(keys[m])
            self.grads[m].append(grads[m])
        self.tokens += max(keys[m].shape[0] for m in self.modules)

    def take(self) -> tuple[dict, dict]:
        """Everything gathered (keys, value-gradients by module), and an empty buffer."""
        out = ({m: torch.cat(v) for m, v in self.keys.items()}, {m: torch.cat(v) for m, v in self.grads.items()})
        for m in self.modules:
            self.keys[m], self.grads[m] = [], []
        self.tokens = 0
        return out


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


# ---------------------------------------------------------------- applying shifts

class EditHandle:
    """The shifts of one edit and the weights it replaced, for an exact revert.

    Handles on one model may be reverted in any order.  Reverting the newest copies its weights
    back (never subtracts).  Reverting an older one first takes the model back, bitwise, to
    before that edit (undoing the later ones, newest first) and then applies the later edits
    again: the model is exactly the one the later edits alone would have made.
    """

    def __init__(self, model: nn.Module, shifts: dict[str, torch.Tensor], report: dict | None = None):
        """``report``: what the method tells of its edit (MALMEN: ``fit`` and ``room``, solver.report)."""
        self.model, self.shifts = model, shifts
        self.report = dict(report or {})
        self.active = False
        self._apply()

    def _apply(self) -> None:
        self.originals = {name: self.model.get_submodule(name).weight.detach().clone() for name in self.shifts}
        for name, shift in self.shifts.items():
            linear.add_shift(self.model.get_submodule(name), shift)
        _active_edits(self.model).append(self)
        self.active = True

    def _restore(self) -> None:
        with torch.no_grad():
            for name, weight in self.originals.items():
                self.model.get_submodule(name).weight.copy_(weight)

    def revert(self) -> None:
        """Take this edit out, whatever the order (see the class docstring)."""
        if not self.active:
            return
        edits = _active_edits(self.model)
        position = edits.index(self)
        later = edits[position + 1:]
        for handle in reversed(edits[position:]):
            handle._restore()
        del edits[position:]
        self.active = False
        for handle in later:
            handle._apply()

    def __enter__(self) -> "EditHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.revert()


# the edits applied to each live model, oldest first (weak: forgetting a model forgets its edits)
_EDITS: "weakref.WeakKeyDictionary[nn.Module, list[EditHandle]]" = weakref.WeakKeyDictionary()


def _active_edits(model: nn.Module) -> list[EditHandle]:
    return _EDITS.setdefault(model, [])


@contextmanager
def suspended_edits(model: nn.Module) -> Iterator[None]:
    """The base weights inside (every edit applied to ``model`` taken out, newest first); the
    edits are applied again on exit, bit for bit as they were."""
    edits = list(_active_edits(model))
    for handle in reversed(edits):  # each is the newest when its turn comes: a plain copy back
        handle.revert()
    try:
        yield
    finally:
        for handle in edits:
            handle._apply()


# ---------------------------------------------------------------- the editor

class MalmenEditor(ShapedRegulariser):
    """A meta-learned editor bound to a model: ``edit(facts)`` applies one aggregated shift."""

    def __init__(self, model: nn.Module, tokenizer, config: EditorConfig | None = None,
                 hypernet: HyperNetwork | None = None, adapter: Adapter | None = None):
        self.config = config or EditorConfig()
        self.adapter = adapter or adapter_for(model, tokenizer)
        self.model = model
        modules = self.config.modules or self.adapter.default_modules()
        self.config.modules = self.adapter.check_modules(modules)
        shapes = shapes_of(model, self.config.modules)
        self.config.check()
        if self.config.keys not in self.adapter.key_positions:
            raise ValueError(f"{type(self.adapter).__name__} reads keys at {', '.join(self.adapter.key_positions)}, "
                             f"not {self.config.keys!r}")
        self.hypernet = hypernet or HyperNetwork(shapes, self.config.hyper)
        if self.hypernet.shapes != shapes:
            raise ValueError(f"editor was built for modules {self.hypernet.shapes}, model has {shapes}")
        self.hypernet.to(self.adapter.device)
        self.metadata: dict = {}  # extra editor.json entries (training history, provenance), kept on save
        self.init_shape()  # the regulariser's shape and where its statistics come from (regulariser.py)

    @property
    def modules(self) -> list[str]:
        return self.config.modules

    def placement(self) -> dict[str, torch.device]:
        """The device of each edited module's weight.  A model spread over devices (a device map)
        keeps each module's sums and shift there; the hyper-network stays on the input device."""
        return {name: self.model.get_submodule(name).weight.device for name in self.modules}

    def new_aggregator(self):
        """Empty sufficient statistics of the editor's aggregation (solver.py), over all its modules,
        each module's beside its weight."""
        priors = self.priors()
        extra = {} if priors is None else {"priors": priors}
        return AGGREGATIONS[self.config.aggregation](self.hypernet.shapes, device=self.adapter.device,
                                                      placement=self.placement(), **extra)

    def batches(self, facts: Iterable[Fact], prompt: Callable[[Fact], str] = lambda f: f.prompt) -> Iterator[Batch]:
        """Teacher-forced LM micro-batches of ``facts``, grouped by length to waste little padding."""
        for batch, _ in self.batches_with_facts(facts, prompt):
            yield batch

    def batches_with_facts(self, facts: Iterable[Fact], prompt: Callable[[Fact], str] = lambda f: f.prompt
                           ) -> Iterator[tuple[Batch, list[Fact]]]:
        """``batches``, each with its facts in row order."""
        yield from fact_batches(self.adapter, facts, self.config.lm_batch_size, self.config.keys, prompt)

    def chunks(self, keys: dict, grads: dict) -> Iterator[dict[str, Tokens]]:
        """The traced tokens through the hyper-network, ``hyper_batch_size`` tokens at a time, every
        module's tokens of a chunk together (a joint solve needs them side by side).  Gradients flow
        to the hyper-network when the caller enables grad."""
        counts = {name: keys[name].shape[0] for name in self.modules}
        device = self.adapter.device
        for s in chunks(max(counts.values()), self.config.hyper_batch_size):
            chunk = {}
            for name in self.modules:
                if s.start >= counts[name]:
                    continue  # modules may see fewer tokens (a T5 decoder layer against its encoder)
                ks, gs = keys[name][s].to(device), grads[name][s].to(device)  # cached keys may be on disk
                pk, pg = self.hypernet(name, ks, gs, self.config.hyper_precision)
                chunk[name] = Tokens(ks, pk, pg, self.hypernet.eta(name))
            yield chunk

    def accumulate(self, aggregator, keys: dict, grads: dict) -> None:
        """Feed one traced micro-batch through the hyper-network into the aggregator."""
        with torch.no_grad():
            for chunk in self.chunks(keys, grads):
                aggregator.accumulate(chunk)

    def lambdas(self, counts: Mapping[str, torch.Tensor | float] | None = None) -> dict[str, torch.Tensor]:
        """Each module's regulariser of the normal equation for a solve over ``counts[module]``
        keys (None: at the reference count N0): the learned lambda (N / N0)^alpha times
        ``config.lambda_scale`` (above 1 the shifts move unrelated keys less, below 1 they write
        the facts harder; the scale is a user's choice at edit time, trained as it is saved)."""
        counts = counts or {}
        return {name: self.hypernet.lam(name, counts.get(name)) * self.config.lambda_scale for name in self.modules}

    def solve(self, aggregator):
        """The solution (``.shifts``: each module's shift) of the accumulated statistics, with the
        regularisers of ``lambdas`` at the aggregator's key counts."""
        with torch.no_grad():
            return aggregator.solve(self.lambdas(aggregator.counts()))

    def shifts(self, facts: Iterable[Fact], progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
        """The shift of every edited module for all ``facts`` (streamed; memory flat in their number
        but for one fingerprint per distinct fact: identical facts count once).

        Under torch.distributed each process traces its share of the facts; the sums are added
        over the processes, rank 0 solves and the shifts are broadcast (distributed.py)."""
        return self.solved(facts, progress)[0]

    def solved(self, facts: Iterable[Fact], progress: Callable[[int], None] | None = None, report: bool = False
               ) -> tuple[dict[str, torch.Tensor], dict]:
        """``shifts`` and, with ``report``, what the solve tells of itself (solver.report: each
        module's ``fit`` and ``room``; {} on processes other than rank 0, or without ``report``)."""
        aggregator = self.new_aggregator()
        seen = 0
        pending = TokenBuffer(self.modules)
        for batch in self.batches(distributed.shard(distinct(facts))):
            pending.add(*trace(self.adapter, self.modules, batch, self.config.keys))
            if pending.tokens >= self.config.hyper_batch_size:
                self.accumulate(aggregator, *pending.take())
            seen += len(batch)
            if progress:
                progress(len(batch))
        if pending.tokens:
            self.accumulate(aggregator, *pending.take())
        if distributed.total(seen, self.adapter.device) == 0:
            raise ValueError("no facts to edit")
        distributed.all_reduce_statistics(aggregator)
        told = {}
        if distributed.is_main():
            solution = self.solve(aggregator)
            shifts = solution.shifts
            if report:  # an O(a^3) step per module: asked for by edits, not by speed benchmarks
                with torch.no_grad():
                    told = solver_report(aggregator, solution)
        else:
            placement = self.placement()
            shifts = {m: torch.empty(a, b, device=placement[m]) for m, (a, b) in self.hypernet.shapes.items()}
        distributed.broadcast(shifts.values())
        return shifts, told

    def edit(self, facts: Iterable[Fact], progress: Callable[[int], None] | None = None) -> EditHandle:
        """Apply one aggregated update for all facts; the handle reverts it exactly.  Its report
        holds each module's ``fit``, the R^2 of its least squares (how much of the asked-for value
        differences the shift writes), and ``room``, the tokens' mean leverage (the share of what is
        particular to one token that the shift can write; past the key size it falls as 1 / tokens)."""
        shifts, told = self.solved(facts, progress, report=True)
        return EditHandle(self.model, shifts, told)

    def transplanted(self, modules: Sequence[str], eta_factor: float = 1.0) -> "MalmenEditor":
        """This editor moved to other ``modules`` of the same model, to continue meta-training.

        Each module starts as the trained module of the same shape nearest to it in the model
        (see ``HyperNetwork.transplant``); ``eta_factor`` scales every step.
        """
        modules = self.adapter.check_modules(list(modules))
        shapes = shapes_of(self.model, modules)
        order = [name for name, _ in self.model.named_modules()]
        sources = nearest_sources(order, shapes, self.hypernet.shapes)
        config = EditorConfig.from_dict({**self.config.to_dict(), "modules": modules})
        editor = MalmenEditor(self.model, self.adapter.tokenizer, config,
                              self.hypernet.transplant(shapes, sources, eta_factor), self.adapter)
        editor.metadata = {**self.metadata, "transplanted": {"from": list(self.modules), "sources": sources,
                                                             "eta_factor": eta_factor}}
        editor.metadata.pop("kept_prior", None)  # a kept shape describes the old modules' inputs
        return editor

    def widened(self, rank: int) -> "MalmenEditor":
        """This editor with hyper-network blocks of a higher ``rank`` and the same shifts, to continue
        meta-training (``HyperNetwork.widened``)."""
        hypernet = self.hypernet.widened(rank)
        config = EditorConfig.from_dict({**self.config.to_dict(), "hyper": hypernet.config.to_dict()})
        editor = MalmenEditor(self.model, self.adapter.tokenizer, config, hypernet, self.adapter)
        editor.metadata = {**self.metadata, "widened": {"from_rank": self.config.hyper.rank, "to_rank": rank}}
        editor.kept_prior = self.kept_prior  # the same modules: the same inputs
        return editor

    # --- persistence (safetensors + JSON, Hugging Face style)
    def save_pretrained(self, path: str | Path, extra: dict | None = None,
                        tensor_files: dict[str, dict[str, torch.Tensor]] | None = None,
                        factor_dtype: torch.dtype | None = None) -> None:
        """Write editor.safetensors and editor.json (plus ``tensor_files``) into ``path`` atomically.

        ``factor_dtype`` (e.g. torch.float16) stores the hyper-network's low-rank factors in that
        dtype, about half the file (``HyperNetwork.stored_state``); editor.json records it."""
        meta = {
            "format": FORMAT, "version": VERSION,
            "config": self.config.to_dict(),
            "shapes": {k: list(v) for k, v in self.hypernet.shapes.items()},
            "base_model": model_identity(self.model, self.modules),
        }
        if factor_dtype is not None:
            meta["stored_factors"] = str(factor_dtype).removeprefix("torch.")
        for key, value in {**self.metadata, **(extra or {})}.items():
            meta.setdefault(key, value)  # never overrides the core entries above
        with io.atomic_dir(path, marker=EDITOR_FILE) as tmp:
            io.save_tensors(tmp / EDITOR_WEIGHTS, self.hypernet.stored_state(factor_dtype))
            if self.kept_prior is not None:
                io.save_tensors(tmp / EDITOR_PRIOR, flat_prior(self.kept_prior))
            for filename, tensors in (tensor_files or {}).items():
                io.save_tensors(tmp / filename, tensors)
            io.write_json(tmp / EDITOR_FILE, meta)

    @staticmethod
    def read_config(path: str | Path) -> dict:
        """editor.json of an editor directory or shipped editor name, checked for our format."""
        return registry.editor_config(path)

    @classmethod
    def from_pretrained(cls, path: str | Path, model: nn.Module, tokenizer, strict_base: bool = True) -> "MalmenEditor":
        """Load an editor saved by ``save_pretrained`` for ``model``.

        Raises ValueError if the editor was trained for other modules or another base model
        (``strict_base=False`` downgrades a weight-fingerprint mismatch to a warning).
        """
        path = registry.resolve_editor(path)
        meta = cls.read_config(path)
        config = EditorConfig.from_dict(meta["config"])
        adapter = adapter_for(model, tokenizer)
        adapter.check_modules(config.modules)
        shapes = {k: tuple(v) for k, v in meta["shapes"].items()}
        if shapes_of(model, config.modules) != shapes:
            raise ValueError(f"{path}: editor was trained for modules of shapes {shapes}, not this model's")
        trained = meta.get("base_model", {})
        sample = trained.get("weight_sample")
        if sample is not None and not same_weights(sample, weight_sample(model, config.modules)):
            message = f"{path}: editor was trained on another base model ({trained.get('name')!r})"
            if strict_base:
                raise ValueError(message)
            import warnings
            warnings.warn(message)
        hypernet = HyperNetwork.from_file(Path(path) / EDITOR_WEIGHTS, shapes, config.hyper)
        editor = cls(model, tokenizer, config, hypernet, adapter)
        core = {"format", "version", "config", "shapes", "base_model", "stored_factors"}
        editor.metadata = {k: v for k, v in meta.items() if k not in core}
        if (Path(path) / EDITOR_PRIOR).is_file():
            editor.kept_prior = nested_prior(io.load_tensors(Path(path) / EDITOR_PRIOR), config.modules)
        return editor


def from_method(model: nn.Module, tokenizer, editor: str | None, options: dict, method) -> MalmenEditor:
    """The factory of the 'malmen' and 'mend' methods (methods.py): a trained editor, loaded, with
    the method's options (``lambda_scale``, ``regulariser``, ``prior_mix``, ``stats_dir``, ``stats_texts``,
    ``stats_data``, ``rephrase_share``) applied;
    an option left at None keeps the editor's own setting.  ``stats_data``: a fact file (its train
    part is read) or the facts themselves, of which the first ``stats_texts`` are used."""
    loaded = MalmenEditor.from_pretrained(editor, model, tokenizer)
    for key in ("lambda_scale", "regulariser", "prior_mix"):
        if options.get(key) is not None:
            setattr(loaded.config, key, options[key])
    loaded.config.check()
    if options.get("stats_dir"):
        loaded.stats_dir = options["stats_dir"]
    if options.get("stats_texts"):
        loaded.corpus = Corpus(texts=options["stats_texts"])
    facts = None  # None keeps the editor's kept shape (or sampled text); a rephrase share is then refused
    data = options.get("stats_data")
    if isinstance(data, (str, os.PathLike)):
        from .datasets import load_facts

        data = load_facts(data, split="train")  # never a held-out part's own locality prompts
    if data is not None:  # facts already read (the CLI's, checked with its --target and --format) or just opened
        facts = list(islice(data, options.get("stats_texts") or 512))
    loaded.use_statistics_of(facts, options.get("rephrase_share") or 0.0)
    return loaded
