"""The shape P of MALMEN's regulariser λ P (solver.NormalEquation), as a part of the editor.

λ I is the paper's; with ``regulariser='keys'`` P is the second moment of each edited module's keys,
taken at the answer positions of facts' locality prompts (keystats.answer_moments) or over text the
model samples (keystats.key_moments), optionally blended with how facts' answer keys move from
prompt to rephrase (keystats.rephrase_moments, ``rephrase_share``), once per source, or kept with the
editor in eigenpairs (``keep_prior``, EDITOR_PRIOR) so that it edits with that shape without the data.

``ShapedRegulariser`` holds where the statistics come from and what was taken; ``MalmenEditor``
mixes it in and provides ``model``, ``adapter``, ``modules``, ``placement``, ``config``, ``hypernet`` and
``metadata``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .facts import Fact
from .keystats import (Corpus, answer_moments, blended, compressed_prior, expanded_prior, key_moments, key_prior,
                       rephrase_moments)
from .solver import Shape
from .timing import timed


class ShapedRegulariser:
    """The regulariser-shape part of an editor (see the module's docstring)."""

    def init_shape(self) -> None:
        """No statistics taken and none kept; ``regulariser='keys'`` samples text unless told otherwise."""
        self.stats_dir: str | None = "~/.cache/malmen"  # where key statistics are cached (None: not at all)
        self.corpus = Corpus()                            # the text they are taken over (regulariser 'keys') ...
        self.stats_facts: list[Fact] | None = None        # ... or these facts' locality prompts, where given,
        self.rephrase_share = 0.0                         # ... blended with their rephrases' key moves
        self._moments: tuple[tuple, dict] | None = None   # (source, {module: E[k kᵀ]}): the statistics, once
        self.kept_prior = None

    @property
    def kept_prior(self) -> dict[str, dict[str, torch.Tensor]] | None:
        """The regulariser's shape kept with the editor (EDITOR_PRIOR, ``keep_prior``), used unless
        ``stats_facts`` are given: {module: keystats.compressed_prior's parts}."""
        return self._kept

    @kept_prior.setter
    def kept_prior(self, kept: dict[str, dict[str, torch.Tensor]] | None) -> None:
        self._kept = kept
        self._expanded: dict[str, torch.Tensor] | None = None  # {module: P}, expanded on first use
        self._shapes: tuple | None = None  # (moments, (mix, placement), {module: Shape}): priors(), made once

    def priors(self) -> dict[str, Shape] | None:
        """Each module's regulariser shape P in the normal equation's lambda P (solver.NormalEquation):
        None for the paper's identity; for ``regulariser='keys'`` the second moment of the module's
        keys, scaled to mean eigenvalue 1 and mixed with the identity (``prior_mix``): at the answer
        positions of ``stats_facts``' locality prompts where given (keystats.answer_moments), else
        over text the model samples itself (``corpus``, keystats.key_moments; cached in ``stats_dir``).
        The statistics are taken on first use from the model as it is then, and kept: they describe
        the unedited model's inputs.  The shapes, each with its Cholesky factor beside its module's
        weight, are made once for these moments, mix and placement and reused by every edit."""
        if self.config.regulariser == "identity":
            return None
        if self.kept_prior is not None and self.stats_facts is None:
            if self._expanded is None:
                self._expanded = {m: expanded_prior(**self.kept_prior[m]) for m in self.modules}
            moments = self._expanded
        else:
            moments, _ = self.checked_statistics()
        placement = self.placement()
        made_for = (self.config.prior_mix, tuple(placement.items()))
        if self._shapes is None or self._shapes[0] is not moments or self._shapes[1] != made_for:
            shapes = {m: Shape.of(key_prior(moments[m], self.config.prior_mix), placement[m]) for m in self.modules}
            self._shapes = (moments, made_for, shapes)
        return self._shapes[2]

    def checked_statistics(self) -> tuple[dict[str, torch.Tensor], int]:
        """``key_statistics``: E[k kᵀ] per module and the keys' count, refused when they come from fewer keys than the key
        size and the shape alone regularises (prior mix 1): C of fewer keys is singular."""
        means, count = self.key_statistics()
        a = max(self.hypernet.shapes[m][0] for m in self.modules)
        if self.config.prior_mix == 1.0 and count < a:
            raise ValueError(f"key statistics of {count} keys, fewer than the key size {a}: the regulariser "
                             "would leave directions unregularised; give more texts or facts, or a prior mix below 1")
        return means, count

    def key_statistics(self) -> tuple[dict[str, torch.Tensor], int]:
        """E[k kᵀ] of every edited module and the number of keys behind it, from ``stats_facts``
        or ``corpus`` (see ``priors``); with a ``rephrase_share`` r, (1 - r) C' + r W' instead
        (keystats.blended: W the moves of the keys from the facts' prompts to their rephrases);
        computed once per source and kept."""
        if not self._statistics_kept():
            if self.stats_facts is not None:
                pairs = [(f.locality_prompt, f.locality_answer) for f in self.stats_facts if f.has_locality]
                if not pairs:
                    raise ValueError("the key statistics' facts have no locality prompts")
                moments = answer_moments(self.adapter, self.modules, *map(list, zip(*pairs)),
                                         batch_size=self.config.lm_batch_size)
            else:
                moments = key_moments(self.model, self.adapter.tokenizer, self.modules, self.corpus, cache=self.stats_dir)
            means = {m: moments.mean(m) for m in self.modules}
            if self.rephrase_share:
                moves = self.rephrase_statistics()
                means = {m: blended(means[m], moves[m], self.rephrase_share) for m in self.modules}
            self._moments = (self._statistics_source(), (means, moments.count))
        return self._moments[1]

    def rephrase_statistics(self) -> dict[str, torch.Tensor]:
        """E[(k' - k)(k' - k)ᵀ] of every edited module over ``stats_facts`` with a rephrase
        (keystats.rephrase_moments)."""
        asked = [f for f in self.stats_facts if f.rephrases]
        if not asked:
            raise ValueError("the key statistics' facts have no rephrases (a rephrase share needs them)")
        moves = rephrase_moments(self.adapter, self.modules, [f.prompt for f in asked], [f.rephrases[0] for f in asked],
                                 [f.target for f in asked], batch_size=self.config.lm_batch_size)
        return {m: moves.mean(m) for m in self.modules}

    def keep_prior(self, rank: int, source: str | None = None) -> None:
        """Keep the regulariser's shape from the present statistics (``stats_facts`` or ``corpus``,
        see ``priors``) with the editor, in ``rank`` eigenpairs per module (keystats.compressed_prior):
        saved with it from now on (EDITOR_PRIOR) and used instead of new statistics, so that an
        editor made with one data set's statistics edits without that data.  ``source``: how
        editor.json names the statistics (default: facts' locality prompts, or the sampled corpus)."""
        means, count = self.checked_statistics()
        self.kept_prior = {m: compressed_prior(key_prior(means[m]), rank) for m in self.modules}
        source = source or ("locality prompts of facts" if self.stats_facts is not None
                            else f"{self.corpus.texts} texts of {self.corpus.length} tokens sampled from the model")
        self.metadata["kept_prior"] = {"rank": rank, "keys": count, "source": source}
        if self.rephrase_share:
            self.metadata["kept_prior"]["rephrase_share"] = self.rephrase_share
        self.stats_facts, self.rephrase_share = None, 0.0  # from now on the kept shape is the one used

    def use_statistics_of(self, facts: Sequence[Fact] | None, rephrase_share: float = 0.0) -> None:
        """Take the regulariser's key statistics at the answer positions of ``facts``' locality
        prompts (``priors``); facts given replace a kept shape, None keeps it (or, with none kept,
        the statistics come from text the model samples).  ``rephrase_share`` r: the shape blends
        in, with weight r, how the facts' answer keys move from prompt to rephrase
        (``key_statistics``), so that the shift spares those directions and rephrases get what
        their prompts get."""
        if not 0.0 <= rephrase_share <= 1.0:
            raise ValueError(f"rephrase_share must lie in [0, 1], not {rephrase_share}")
        if rephrase_share and facts is None:
            raise ValueError("a rephrase share needs facts with rephrases (statistics from facts, not sampled text)")
        self.stats_facts, self.rephrase_share = facts, float(rephrase_share)
        if facts is not None:
            self.kept_prior = None
            self.metadata.pop("kept_prior", None)

    def _statistics_source(self) -> tuple:
        return self.stats_facts, self.corpus, tuple(self.modules), self.rephrase_share

    def _statistics_kept(self) -> bool:
        """Whether the kept statistics come from the present source: the same facts object (held,
        so its identity cannot pass to a new list), corpus and modules."""
        if self._moments is None:
            return False
        facts, *rest = self._moments[0]
        return facts is self.stats_facts and tuple(rest) == self._statistics_source()[1:]

    def prepare(self) -> float:
        """The one-time work before editing (methods.prepare): the key statistics a shaped
        regulariser needs; its seconds (0 when none or already computed)."""
        if self.config.regulariser == "identity":
            return 0.0
        kept = self._statistics_kept()
        with timed(self.adapter.device) as took:
            self.priors()  # also refuses statistics too few for the key size, before any edit
        return 0.0 if kept else took.seconds

