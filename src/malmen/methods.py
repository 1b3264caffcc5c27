"""Editing methods by name: the one interface the command line, the evaluation and the benchmarks see.

Every method builds an editor that offers

    editor.modules                        the edited linear layers
    editor.adapter                        how the model is fed (adapters/)
    editor.config.lm_batch_size           facts per LM micro-batch
    editor.shifts(facts) -> {module: S}   the parameter shift of every edited layer
    editor.edit(facts) -> EditHandle      applies them; ``handle.revert()`` restores the weights exactly;
                                          ``handle.report``: what the method tells of the edit (MALMEN: ``fit``, ``room``)

and, when it has learned state, ``save_pretrained(path)`` and ``from_pretrained(path, model,
tokenizer)``; when it needs one-time work before its first edit (MEMIT's key statistics),
``prepare() -> seconds``, which benchmarks call first and report apart from edit time.  A method is a file of its own plus one entry in ``METHODS``: its factory is named
by a string and imported only when the method is built, so the command line checks a user's
input (which methods, which editor) without loading torch.

    from malmen.methods import METHODS
    editor = METHODS["ft-l"].build(model, tokenizer, options={"ft_linf": 1e-4})
"""
from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol


class Editor(Protocol):
    """What every method's editor offers (see the module docstring)."""

    modules: list[str]

    def shifts(self, facts: Iterable, progress=None) -> dict: ...

    def edit(self, facts: Iterable, progress=None): ...


def positive(text: str) -> float:
    """An option's type that refuses zero and negative numbers when the command line is parsed,
    before anything is loaded."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


REGULARISERS = ("identity", "keys")  # shapes of MALMEN's regulariser (editor.MalmenEditor.priors)


def regulariser(text: str) -> str:
    """An option's type: the normal equation's regulariser shape."""
    if text not in REGULARISERS:
        raise argparse.ArgumentTypeError(f"choose {' or '.join(REGULARISERS)}, not {text}")
    return text


def count(text: str) -> int:
    """An option's type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def nonnegative(text: str) -> float:
    """An option's type: zero or a positive number (a weight that may switch its term off)."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be zero or positive, not {text}")
    return value


def fraction(text: str) -> float:
    """An option's type: a number in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], not {text}")
    return value


@dataclass(frozen=True)
class Option:
    """A setting of a method, offered on the command line as ``--flag`` (its dest is the key)."""

    flag: str
    type: type
    default: Any
    help: str

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Method:
    """A named editing method.

    ``factory`` ("module:function" inside malmen) is called as
    ``function(model, tokenizer, editor=..., options=..., method=self)`` and returns an editor.
    ``trained``: the method needs a trained editor (a directory or a shipped name); with
    ``aggregations`` set, that editor must have been trained with one of them.  ``device_map``:
    its editor works on a model spread over several devices (``--device-map``).
    """

    name: str
    factory: str
    summary: str
    trained: bool = False
    aggregations: tuple[str, ...] = ()
    options: tuple[Option, ...] = field(default=())
    device_map: bool = False

    def check(self, editor: str | None) -> dict | None:
        """Check, without loading any model, that ``editor`` suits this method; its editor.json.

        Raises ValueError or FileNotFoundError with a message for the user."""
        from .registry import editor_config

        if editor is None:
            if self.trained:
                raise ValueError(f"--method {self.name} needs a trained editor (--editor DIR or a shipped name)")
            return None
        config = editor_config(editor)
        trained_with = config["config"].get("aggregation")
        if self.aggregations and trained_with not in self.aggregations:
            fitting = [m.name for m in METHODS.values() if trained_with in m.aggregations]
            raise ValueError(f"{editor} was trained with {trained_with!r} aggregation, so it serves "
                             f"--method {', '.join(fitting) or '?'}, not --method {self.name}")
        return config

    def build(self, model, tokenizer, editor: str | None = None, options: dict | None = None):
        """The method's editor for ``model`` (``options``: values of its ``Option``s by dest)."""
        self.check(editor)
        settings = {o.dest: o.default for o in self.options}
        settings.update({k: v for k, v in (options or {}).items() if k in settings})
        module, _, function = self.factory.partition(":")
        build = getattr(importlib.import_module(f".{module}", __package__), function)
        return build(model, tokenizer, editor=editor, options=settings, method=self)


FT_OPTIONS = (
    # defaults: the best mean of ES/GS/LS at n = 128 on SmolLM2 among four settings (docs/RESULTS.md)
    Option("--ft-steps", int, 10, "ft/ft-l: Adam steps on the facts"),
    Option("--ft-lr", float, 5e-3, "ft/ft-l: Adam learning rate"),
)

STATS_TEXTS = Option("--stats-texts", int, 512, "memit, alphaedit, malmen with --regulariser keys: texts of 128 "
                     "tokens sampled from the model for the key statistics C (or facts of --stats-data)")
STATS_DIR = Option("--stats-dir", str, "~/.cache/malmen", "memit, alphaedit, malmen with --regulariser keys: "
                   "where key statistics are cached")

LOCATE_OPTIONS = (
    # defaults: MEMIT's GPT-J settings but the layers (memit.default_layers), the corpus (keystats.py) and λ:
    # GPT-J's 15,000 barely edits SmolLM2 (ES 0.31 at n = 64); 1,000 and the null-space threshold come from
    # the sweep in docs/RESULTS.md (held-out zsRE, n = 64)
    Option("--memit-layers", str, "", "memit/alphaedit: edited blocks, e.g. 3-8 (default: about 10%%-28%% of the depth)"),
    Option("--memit-steps", int, 25, "memit/alphaedit: Adam steps on each fact's target hidden state"),
    Option("--memit-lr", float, 0.5, "memit/alphaedit: learning rate of those steps"),
    Option("--memit-lambda", float, 1000.0, "memit: weight of the key statistics C against the facts' keys"),
    Option("--null-threshold", float, 2e-2, "alphaedit: eigenvalues of C below this span the preserved null space"),
    Option("--alpha-l2", float, 10.0, "alphaedit: ridge term of the projected solve"),
    STATS_TEXTS,
    STATS_DIR,
)

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("malmen", "editor:from_method", "MALMEN: a trained hyper-network, the normal equation over all facts "
           "(per layer, or jointly over the layers for an editor trained with --method joint)",
           trained=True, aggregations=("malmen", "joint"), device_map=True,
           options=(Option("--lambda-scale", positive, None, "malmen: multiply the editor's learned regularisers by this "
                           "(above 1: unrelated inputs move less; below 1: the facts are written harder) "
                           "(default: the editor's own, 1 unless it was exported with --lambda-scale)"),
                    Option("--regulariser", regulariser, None, "malmen: the shape of the regulariser lambda P: identity "
                           "(the paper) or keys (P = the keys' second moment over text the model samples, cached in "
                           "--stats-dir; ordinary inputs' directions move least) (default: as the editor was trained)"),
                    Option("--prior-mix", fraction, None, "malmen: with --regulariser keys, P = (1 - mix) I + mix "
                           "E[k kᵀ] (scaled to mean eigenvalue 1) (default: as the editor was trained)"),
                    Option("--stats-data", str, None, "malmen with --regulariser keys: take the key statistics at "
                           "the answer positions of this fact file's locality prompts (its train part, the first "
                           "--stats-texts), not from text the model samples"),
                    Option("--rephrase-share", fraction, None, "malmen with --stats-data: blend into the regulariser's "
                           "shape, with this weight, how those facts' answer keys move from prompt to rephrase (the "
                           "shift spares those directions, so rephrases get what their prompts get) (default: 0)"),
                    STATS_TEXTS, STATS_DIR)),
    Method("mend", "editor:from_method", "MEND: a trained hyper-network, its shifts summed (needs a MEND-trained editor)",
           trained=True, aggregations=("sum",), device_map=True),
    Method("ft", "baselines.ft:from_method", "fine-tune the edited layers on the facts (Adam)", options=FT_OPTIONS),
    Method("ft-l", "baselines.ft:from_method", "FT with every weight change bounded (ROME/MEMIT's FT-L)",
           options=FT_OPTIONS + (Option("--ft-linf", float, 5e-4, "ft-l: bound on each weight change"),)),
    Method("memit", "memit:from_method", "MEMIT: target hidden states optimised per fact, the update spread over "
           "early-middle MLP layers against key statistics of ordinary text", options=LOCATE_OPTIONS),
    Method("alphaedit", "memit:from_method", "AlphaEdit: MEMIT's update projected on the null space of the key "
           "statistics (preserved outputs do not move)", options=LOCATE_OPTIONS),
)}


def default(flag: str):
    """The default of a method's option, by flag: the one place it is written (library configs such
    as ``memit.MemitConfig`` read theirs from here)."""
    return next(o.default for o in all_options() if o.flag == flag)


def prepare(editor) -> float:
    """Run an editor's one-time work (``prepare``, where it has one); its seconds (0 if none or cached)."""
    return float(editor.prepare()) if hasattr(editor, "prepare") else 0.0


def method_for(name: str | None, editor: str | None) -> Method:
    """The method a user asked for; without a name, the one a trained editor was trained for."""
    if name is not None:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
        return METHODS[name]
    if editor is None:
        raise ValueError("give a trained editor (--editor DIR or a shipped name) or a --method that needs none "
                         f"({', '.join(m.name for m in METHODS.values() if not m.trained)})")
    from .registry import editor_config

    aggregation = editor_config(editor)["config"].get("aggregation")
    fitting = [m for m in METHODS.values() if m.trained and aggregation in m.aggregations]
    if not fitting:
        raise ValueError(f"{editor}: no method uses its aggregation {aggregation!r}")
    return fitting[0]


def all_options() -> list[Option]:
    """Every method's options, each once (the command line offers them all)."""
    seen: dict[str, Option] = {}
    for method in METHODS.values():
        for option in method.options:
            seen.setdefault(option.flag, option)
    return list(seen.values())
