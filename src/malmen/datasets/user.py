"""Plain user facts: one JSON object per line (or a JSON array) with our own field names.

Required: ``prompt``, ``target``.  Optional: ``rephrases`` (string or list), ``locality_prompt`` and
``locality_answer`` (both or neither), ``subject``, ``true_answer``, ``id``.
"""
from __future__ import annotations

from ..facts import Fact, Record

KEYS = {"prompt", "target"}


def from_user(record: Record, target: str = "new") -> Fact:
    truth = record.text("true_answer", required=target == "true")
    loc_prompt = record.text("locality_prompt", required=False)
    loc_answer = record.text("locality_answer", required=loc_prompt is not None)
    if loc_answer is not None and loc_prompt is None:
        raise record.error("locality_prompt", "missing (locality_answer is given)")
    return Fact(
        prompt=record.text("prompt"),
        target=record.text("target") if target == "new" else truth,
        rephrases=record.texts("rephrases"),
        locality_prompt=loc_prompt,
        locality_answer=loc_answer,
        subject=record.text("subject", required=False),
        true_answer=truth,
        uid=record.uid("id"),
    )
