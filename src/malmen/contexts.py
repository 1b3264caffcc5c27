"""Contexts: every fact traced again behind short prefixes, so that its shift holds beyond the
words of its own prompt.

A key at an answer position describes the prompt as much as the fact; a rephrase of the fact
gives the edited layers other keys, which the shift may not reach.  MEMIT meets this by fitting
each fact's target hidden state under several prefixes of model-written text ("context
templates"); here the fact is simply traced once more behind each prefix, so that the solve sees
the fact's keys in several contexts and writes a shift that serves them all:

    facts = list(in_contexts(facts, PREFIXES[:3]))   # each fact, then its three prefixed copies

The copies are ordinary facts (prompt, target, subject), so nothing else in the editor changes;
they cost tracing time and keys in proportion to their number.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Iterator, Sequence

from .facts import Fact

# short, neutral sentences, each ending a sentence so that the prompt starts a new one
PREFIXES: tuple[str, ...] = (
    "Here is a fact.",
    "I read this in a book.",
    "The following is true.",
    "Let me tell you something.",
    "This is well known.",
    "Everyone agrees on this.",
    "A short note.",
    "Listen carefully.",
)


def prefixes(count: int) -> list[str]:
    """The first ``count`` of ``PREFIXES``; refuses more than there are."""
    if not 0 <= count <= len(PREFIXES):
        raise ValueError(f"contexts must be between 0 and {len(PREFIXES)}, not {count}")
    return list(PREFIXES[:count])


def in_contexts(facts: Iterable[Fact], contexts: Sequence[str]) -> Iterator[Fact]:
    """Each fact, then one copy of it per context with the context before its prompt (streamed)."""
    for fact in facts:
        yield fact
        for context in contexts:
            yield replace(fact, prompt=f"{context} {fact.prompt}")
