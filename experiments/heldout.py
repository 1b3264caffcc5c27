"""What the experiment scripts share: the shipped model and editor, the held-out zsRE facts they
edit (validation facts 512.., as ``malmen eval --split val --skip 512``) and the report."""
import json

from malmen import MalmenEditor, load_facts, load_model
from malmen.evaluate import evaluate, table

ZSRE = "../shared/data/zsre/zsre_mend_eval_with_subject.json"


def load(editor_name: str):
    """SmolLM2 and the named editor on it."""
    model, tok = load_model("smollm2-135m")
    return model, MalmenEditor.from_pretrained(editor_name, model, tok)


def report(editor: MalmenEditor, n: int, out: str) -> None:
    """Edit the first n held-out facts in one group; print ``malmen eval``'s table and save JSON."""
    facts = list(load_facts(ZSRE, target="new", split="val"))[512:512 + n]
    result = evaluate(editor, facts, n, generate=False)
    print(table(result))
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
