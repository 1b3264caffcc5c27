"""CounterFact, in the simplified EasyEdit schema and in ROME's original schema."""
from __future__ import annotations

from ..facts import Fact, Record

EASYEDIT_KEYS = {"prompt", "target_new", "rephrase_prompt"}
ROME_KEYS = {"requested_rewrite"}


def from_easyedit(record: Record, target: str = "new") -> Fact:
    truth = record.text("ground_truth", required=target == "true")
    new = record.text("target_new")
    return Fact(
        prompt=record.text("prompt"),
        target=new if target == "new" else truth,
        rephrases=record.texts("rephrase_prompt", required=True),
        locality_prompt=record.text("locality_prompt"),
        locality_answer=record.text("locality_ground_truth"),
        subject=record.text("subject", required=False),
        true_answer=truth,
        uid=record.uid("case_id"),
    )


def from_rome(record: Record, target: str = "new") -> Fact:
    rewrite = record.sub("requested_rewrite")
    subject = rewrite.text("subject")
    template = rewrite.text("prompt")
    if "{}" not in template:
        raise rewrite.error("requested_rewrite.prompt", "has no '{}' placeholder for the subject")
    new = rewrite.sub("target_new").text("str")
    truth = rewrite.sub("target_true").text("str")
    neighbours = record.texts("neighborhood_prompts")
    return Fact(
        prompt=template.format(subject),
        target=new if target == "new" else truth,
        rephrases=record.texts("paraphrase_prompts", required=True),
        # A neighbourhood prompt shares the relation, so its true answer is the original object.
        locality_prompt=neighbours[0] if neighbours else None,
        locality_answer=truth if neighbours else None,
        subject=subject,
        true_answer=truth,
        uid=record.uid("case_id"),
    )
