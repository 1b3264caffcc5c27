"""Facts: the record every editor consumes, its validation, and the readers for fact files.

A fact is one edit request: a prompt, the answer the edited model should give, and, for training
and evaluation, rephrased prompts (generalisation) and an unrelated prompt with its answer
(locality).  Readers stream records and convert them with a format-specific function; any
malformed record raises :class:`FactError`, whose message names the file, the record and the field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


class FactError(ValueError):
    """A fact file or record is malformed.  ``str(err)`` is a one-line message for the user.

    ``record`` counts from 1, as people do: record 1 is the first object of the file (line 1 of a
    JSONL file without blank lines)."""

    def __init__(self, source: str, record: int | None, field_name: str | None, reason: str):
        self.source, self.record, self.field, self.reason = source, record, field_name, reason
        where = source
        if record is not None:
            where += f": record {record}"
        if field_name is not None:
            where += f": field '{field_name}'"
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class Fact:
    """One edit request.

    ``prompt`` and ``target`` are required; ``rephrases`` (the first one is the headline rephrase
    used for GS), ``locality_prompt``/``locality_answer``, ``subject`` and ``true_answer`` are
    optional.  ``uid`` is a stable identifier (for example zsRE's ``case_id``) used for splits.
    """

    prompt: str
    target: str
    rephrases: tuple[str, ...] = ()
    locality_prompt: str | None = None
    locality_answer: str | None = None
    subject: str | None = None
    true_answer: str | None = None
    uid: str | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def has_locality(self) -> bool:
        return self.locality_prompt is not None and self.locality_answer is not None


# ---------------------------------------------------------------- field accessors (validating)

class Record:
    """A raw JSON object with its position (``index``, from 0), offering validated field access."""

    def __init__(self, obj: Any, source: str, index: int):
        self.source, self.index = source, index
        if not isinstance(obj, dict):
            raise FactError(source, index + 1, None, f"expected a JSON object, got {type(obj).__name__}")
        self.obj = obj

    def error(self, name: str | None, reason: str) -> FactError:
        return FactError(self.source, self.number, name, reason)

    @property
    def number(self) -> int:
        """The record's position counted from 1 (how messages name it)."""
        return self.index + 1

    def has(self, name: str) -> bool:
        return self.obj.get(name) is not None

    def text(self, name: str, required: bool = True) -> str | None:
        """A non-empty string field (surrounding whitespace stripped)."""
        if name not in self.obj or self.obj[name] is None:
            if required:
                raise self.error(name, "missing")
            return None
        value = self.obj[name]
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {type(value).__name__}")
        value = value.strip()
        if not value:
            raise self.error(name, "empty string")
        return value

    def texts(self, name: str, required: bool = False) -> tuple[str, ...]:
        """A string or a list of non-empty strings."""
        value = self.obj.get(name)
        if value is None:
            if required:
                raise self.error(name, "missing")
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise self.error(name, f"expected a string or a list of strings, got {type(value).__name__}")
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise self.error(f"{name}[{i}]", "expected a non-empty string")
            out.append(item.strip())
        if required and not out:
            raise self.error(name, "empty list")
        return tuple(out)

    def sub(self, name: str) -> "Record":
        value = self.obj.get(name)
        if not isinstance(value, dict):
            raise self.error(name, "missing or not an object")
        return Record(value, self.source, self.index)

    def uid(self, name: str) -> str | None:
        value = self.obj.get(name)
        if value is None:
            return None
        if not isinstance(value, (int, str)) or isinstance(value, bool):
            raise self.error(name, "expected an integer or a string")
        return str(value)


# ---------------------------------------------------------------- raw readers (streaming)

def read_records(path: str | Path) -> Iterator[Record]:
    """Yield the records of a JSON array file or a JSONL file (one object per line, streamed)."""
    path = Path(path)
    source = str(path)
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise FactError(source, None, None, f"cannot open: {err.strerror}") from None
    with handle:
        head = handle.read(4096).lstrip()
        handle.seek(0)
        if head.startswith(b"["):
            try:
                items = json.loads(handle.read().decode("utf-8"))
            except UnicodeDecodeError as err:
                raise FactError(source, None, None, f"not valid UTF-8 (byte {err.start})") from None
            except json.JSONDecodeError as err:
                raise FactError(source, None, None, f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
            for i, obj in enumerate(items):
                yield Record(obj, source, i)
            return
        index = 0
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                raise FactError(source, index + 1, None, f"line {lineno} is not valid UTF-8 (byte {err.start})") from None
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise FactError(source, index + 1, None, f"line {lineno}: invalid JSON: {err.msg}") from None
            yield Record(obj, source, index)
            index += 1


def require_nonempty(facts: Iterable[Fact], source: str) -> Iterator[Fact]:
    """Pass facts through, raising a FactError if there are none at all."""
    any_seen = False
    for fact in facts:
        any_seen = True
        yield fact
    if not any_seen:
        raise FactError(source, None, None, "contains no facts")


def distinct(facts: Iterable[Fact]) -> Iterator[Fact]:
    """Each fact once: a repeat of an earlier (prompt, target) is dropped.

    Editors count identical facts once, so that a thousand copies of a fact edit like one (the
    normal equation would otherwise weight the copies a thousand times against its regulariser).
    Costs one fingerprint per distinct fact, about 70 bytes.
    """
    seen: set[int] = set()
    for fact in facts:
        key = hash((fact.prompt, fact.target))
        if key not in seen:
            seen.add(key)
            yield fact


def convert(records: Iterable[Record], to_fact: Callable[[Record], Fact]) -> Iterator[Fact]:
    for record in records:
        yield to_fact(record)
