"""zsRE (MEND split) in its two field conventions, and our fixed train/validation split.

MEND/ROME names: ``src, rephrase, alt, answers, loc, loc_ans`` (the 1k training subset).
EasyEdit names: ``prompt, target_new, ground_truth, paraphrase_prompts, similar_prompts,
locality_prompt, locality_ground_truth`` (the eval file with subjects).
``target="new"`` edits in the counterfactual answer (MEND's ``alt``); ``"true"`` the true answer.
"""
from __future__ import annotations

import hashlib

from ..facts import Fact, Record

MEND_KEYS = {"src", "alt"}
EASYEDIT_KEYS = {"prompt", "target_new", "paraphrase_prompts"}


def _locality_prompt(record: Record, name: str) -> str:
    return record.text(name)


def from_mend(record: Record, target: str = "new") -> Fact:
    answers = record.texts("answers", required=True)
    alt = record.text("alt")
    return Fact(
        prompt=record.text("src"),
        target=alt if target == "new" else answers[0],
        rephrases=record.texts("rephrase", required=True),
        locality_prompt=_locality_prompt(record, "loc"),
        locality_answer=record.text("loc_ans"),
        subject=record.text("subject", required=False),
        true_answer=answers[0],
        uid=record.uid("case_id"),
    )


def from_easyedit(record: Record, target: str = "new") -> Fact:
    truth = record.text("ground_truth", required=target == "true")
    new = record.text("target_new")
    rephrases = record.texts("paraphrase_prompts", required=True) + record.texts("similar_prompts")
    return Fact(
        prompt=record.text("prompt"),
        target=new if target == "new" else truth,
        rephrases=rephrases,
        locality_prompt=_locality_prompt(record, "locality_prompt"),
        locality_answer=record.text("locality_ground_truth"),
        subject=record.text("subject", required=False),
        true_answer=truth,
        uid=record.uid("case_id"),
    )


# The split is part of our results' definition: never change it.  Every record falls in one of
# three parts by its case_id (or, without one, the SHA-1 of its prompt) modulo 10:
#   0        'val'   validation: checkpoint selection and the held-out figures (about 10%);
#   1, 2, 3  'test'  held out from meta-training since issue 17, so that thousands of facts at once
#                    (n = 4,096) can be measured on facts no editor has seen (about 30%); editors
#                    shipped before issue 17 were trained on these and must not be measured on them;
#   4 to 9   'train' meta-training (about 60%).
VAL_MODULUS = 10
TEST_RESIDUES = (1, 2, 3)
SPLITS = ("train", "val", "test")


def split_of(fact: Fact) -> str:
    """'train', 'val' or 'test' for a zsRE fact, deterministically."""
    if fact.uid is not None and fact.uid.isdigit():
        key = int(fact.uid)
    else:
        key = int(hashlib.sha1(fact.prompt.encode("utf-8")).hexdigest(), 16)
    residue = key % VAL_MODULUS
    return "val" if residue == 0 else "test" if residue in TEST_RESIDUES else "train"
