"""Fact checking: the MEND/MALMEN FEVER format, and claims derived from CounterFact.

A fact-checking edit flips the verdict on a claim: ``prompt`` is the claim, ``target`` the verdict
the edited classifier should give (SUPPORTS or REFUTES), the rephrases are equivalent claims
(GS) and the locality prompt is an unrelated claim whose verdict must not change (LS).
"""
from __future__ import annotations

from ..facts import Fact, Record

FEVER_KEYS = {"prompt", "equiv_prompt", "alt", "unrel_prompt"}
VERDICTS = ("SUPPORTS", "REFUTES")


def _verdict(record: Record, name: str, required: bool = True) -> str | None:
    value = record.text(name, required=required)
    if value is not None and value.upper() not in VERDICTS:
        raise record.error(name, f"verdict {value!r} is not SUPPORTS or REFUTES")
    return None if value is None else value.upper()


def flip(verdict: str) -> str:
    return VERDICTS[1 - VERDICTS.index(verdict)]


def from_fever(record: Record, target: str = "new") -> Fact:
    """MEND/MALMEN FEVER: ``alt`` is the flipped verdict (the edit); the true verdict is its flip."""
    alt = _verdict(record, "alt")
    return Fact(
        prompt=record.text("prompt"),
        target=alt if target == "new" else flip(alt),
        rephrases=record.texts("equiv_prompt", required=True),
        locality_prompt=record.text("unrel_prompt"),
        locality_answer=_verdict(record, "unrel_ans"),
        true_answer=flip(alt),
        uid=record.uid("id"),
    )


def claims_from_counterfact(record: Record, target: str = "new") -> Fact:
    """A fact-checking edit derived from a CounterFact record (EasyEdit fields); not FEVER.

    'prompt + true answer' is a true claim (SUPPORTS) and 'prompt + new target' a false one
    (REFUTES).  Records alternate by position: even records edit the false claim to SUPPORTS,
    odd ones the true claim to REFUTES, so that edits flip verdicts both ways.  The rephrase
    gives GS; the locality prompt with its true answer is the unrelated claim (SUPPORTS).
    ``target='true'`` keeps the correct verdict instead of flipping it.
    """
    prompt, new, truth = record.text("prompt"), record.text("target_new"), record.text("ground_truth")
    rephrase = record.texts("rephrase_prompt", required=True)[0]
    answer, correct = (new, "REFUTES") if record.index % 2 == 0 else (truth, "SUPPORTS")
    loc_prompt, loc_answer = record.text("locality_prompt", required=False), record.text("locality_ground_truth", required=False)
    has_loc = loc_prompt is not None and loc_answer is not None
    return Fact(
        prompt=f"{prompt} {answer}",
        target=flip(correct) if target == "new" else correct,
        rephrases=(f"{rephrase} {answer}",),
        locality_prompt=f"{loc_prompt} {loc_answer}" if has_loc else None,
        locality_answer="SUPPORTS" if has_loc else None,
        subject=record.text("subject", required=False),
        true_answer=correct,
        uid=record.uid("case_id"),
    )


def classifier_examples(record: Record) -> list[tuple[str, str]]:
    """Labelled claims for training the classifier itself from a CounterFact record:
    (prompt/rephrase + true answer, SUPPORTS) and (prompt/rephrase + new target, REFUTES)."""
    truth, new = record.text("ground_truth"), record.text("target_new")
    out = []
    for prompt in (record.text("prompt"), *record.texts("rephrase_prompt", required=True)[:1]):
        out += [(f"{prompt} {truth}", "SUPPORTS"), (f"{prompt} {new}", "REFUTES")]
    return out
