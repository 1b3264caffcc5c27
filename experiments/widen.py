"""docs/RESULTS.md row 7: a shipped editor moved to more layers, saved untrained.

    python experiments/widen.py smollm2-zsre-large runs/wide18 18 1.0
    malmen eval --editor runs/wide18 --data ../shared/data/zsre/zsre_mend_eval_with_subject.json \
        --split val --skip 512 --n-edits 1024 --no-generate
"""
import sys

from heldout import load

source, out, first, eta_factor = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
model, editor = load(source)
modules = [f"model.layers.{i}.mlp.down_proj" for i in range(first, model.config.num_hidden_layers)]
editor.transplanted(modules, eta_factor).save_pretrained(out)
print(f"wrote {out}: {len(modules)} modules")
