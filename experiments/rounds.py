"""docs/RESULTS.md row 9: MALMEN in R rounds (edit, re-trace the edited model, add the new shifts).

    python experiments/rounds.py smollm2-zsre-large 2 1024 results/rounds2_large.json

Edits held-out zsRE validation facts 512.. (as ``malmen eval --split val --skip 512``) in one
group of n and prints the same table as ``malmen eval``.  Not part of the library: it did not help.
"""
import json
import sys

from malmen import EditHandle, MalmenEditor, load_facts, load_model
from malmen.evaluate import evaluate, table

ZSRE = "../shared/data/zsre/zsre_mend_eval_with_subject.json"
editor_name, rounds, n, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model, tok = load_model("smollm2-135m")
editor = MalmenEditor.from_pretrained(editor_name, model, tok)


def edit_in_rounds(facts, progress=None):
    facts, total = list(facts), None
    for _ in range(rounds):
        applied = EditHandle(model, total) if total else None  # trace the model edited so far
        shifts = editor.shifts(facts)
        if applied:
            applied.revert()
        total = shifts if total is None else {k: total[k] + shifts[k] for k in shifts}
    return EditHandle(model, total)  # one handle for the sum: exact revert


editor.edit = edit_in_rounds
facts = list(load_facts(ZSRE, target="new", split="val"))[512:512 + n]
result = evaluate(editor, facts, n, generate=False)
print(table(result))
with open(out, "w") as f:
    json.dump(result, f, indent=1)
