"""Fact files in every supported format, detected from the fields of the first record.

>>> facts = list(load_facts("zsre_mend_eval_with_subject.json", target="new"))
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Iterator

from ..facts import Fact, FactError, Record, read_records
from . import counterfact, fever, user, zsre

# name -> (keys whose presence identifies the format, converter)
FORMATS: dict[str, tuple[set[str], Callable[[Record, str], Fact]]] = {
    "facts": (user.KEYS, user.from_user),
    "zsre-mend": (zsre.MEND_KEYS, zsre.from_mend),
    "zsre": (zsre.EASYEDIT_KEYS, zsre.from_easyedit),
    "counterfact": (counterfact.EASYEDIT_KEYS, counterfact.from_easyedit),
    "counterfact-rome": (counterfact.ROME_KEYS, counterfact.from_rome),
    "fever": (fever.FEVER_KEYS, fever.from_fever),
}
# formats derived from another one's records: chosen by name only, never detected
DERIVED: dict[str, Callable[[Record, str], Fact]] = {
    "counterfact-claims": fever.claims_from_counterfact,
}
TARGETS = ("new", "true")


def detect_format(record: Record) -> str:
    """The format whose identifying keys the record has (the most specific one wins).

    A record that has only some of a format's keys is reported as that format with its first
    missing field (``{"prompt": ...}`` without ``target`` is a fact of our own format missing its
    target), so the user reads what to add rather than a list of formats.
    """
    fields = record.obj.keys()
    matches = [name for name, (keys, _) in FORMATS.items() if keys <= fields]
    if matches:
        return max(matches, key=lambda n: len(FORMATS[n][0]))
    overlap = {name: len(keys & fields) / len(keys) for name, (keys, _) in FORMATS.items()}
    closest = max(overlap, key=lambda n: overlap[n])  # ties: the first listed, our own plain format before others
    if overlap[closest] > 0:
        missing = sorted(FORMATS[closest][0] - fields)[0]
        raise record.error(missing, f"missing (the record looks like the {closest!r} format: "
                                    f"{', '.join(sorted(FORMATS[closest][0]))})")
    known = "; ".join(f"{n}: {', '.join(sorted(k))}" for n, (k, _) in FORMATS.items())
    raise record.error(None, f"unknown fact format (fields {sorted(fields)[:8]}); expected one of {known}")


def load_facts(path: str | Path, target: str = "new", fmt: str = "auto",
               split: str | None = None, check_conflicts: bool = False) -> Iterator[Fact]:
    """Stream the facts of ``path``.

    ``target``: 'new' (counterfactual) or 'true' (the true answer).  ``fmt``: 'auto' or a key of
    FORMATS.  ``split``: None, or 'train', 'val' or 'test' to keep one part of the fixed zsRE split.
    ``check_conflicts``: refuse two records with the same prompt and different targets (exact
    duplicates are allowed: editors count them once); costs a small hash table, one entry per
    distinct prompt.
    Raises FactError (file, record, field) on malformed input, including a file with no facts.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    records = read_records(path)
    first = next(records, None)
    if first is None:
        raise FactError(str(path), None, None, "contains no facts")
    name = detect_format(first) if fmt == "auto" else fmt
    converters = {**{n: c for n, (_, c) in FORMATS.items()}, **DERIVED}
    if name not in converters:
        raise ValueError(f"unknown format {fmt!r}; choose from auto, {', '.join(converters)}")
    to_fact = converters[name]
    seen: dict[int, tuple[int, int]] = {}
    for record in itertools.chain([first], records):
        fact = to_fact(record, target)
        if check_conflicts:
            key, value = hash(fact.prompt), hash(fact.target)
            earlier = seen.setdefault(key, (value, record.number))
            if earlier[0] != value:
                raise record.error(None, f"same prompt as record {earlier[1]} with a different target "
                                         f"({fact.target!r}); edit one or the other")
        if split is None or zsre.split_of(fact) == split:
            yield fact


__all__ = ["FORMATS", "DERIVED", "load_facts", "detect_format", "zsre", "counterfact", "fever", "user"]
