"""docs/RESULTS.md row 9: MALMEN in R rounds (edit, re-trace the edited model, add the new shifts).

    python experiments/rounds.py smollm2-zsre-large 2 1024 results/rounds2_large.json

Edits held-out zsRE validation facts 512.. (as ``malmen eval --split val --skip 512``) in one
group of n and prints the same table as ``malmen eval``.  Not part of the library: it did not help.
"""
import sys

from heldout import load, report
from malmen import EditHandle

editor_name, rounds, n, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model, editor = load(editor_name)


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
report(editor, n, out)
