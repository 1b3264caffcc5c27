"""docs/RESULTS.md row 10: one least-squares solve over all edited layers, in dual form.

    python experiments/joint_solve.py smollm2-zsre-large 1024 1.0 results/joint_large_1024_1.0.json

Per layer l: keys K_l (tokens x a) and the hyper-network's value differences D_l.  Target: the sum
of the D_l (times ``scale``).  Minimising |sum_l K_l S_l - D|^2 + sum_l lambda_l |S_l|^2 gives
S_l = K_l^T alpha / lambda_l with alpha = (sum_l K_l K_l^T / lambda_l + I)^-1 D, a tokens x tokens
system.  The hyper-network was trained for one solve per layer, not for this.  Evaluation as in
rounds.py.  Not part of the library: it did not help.
"""
import sys

import torch

from heldout import load, report
from malmen import EditHandle
from malmen.editor import trace
from malmen.solver import value_differences

editor_name, n, scale, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
model, editor = load(editor_name)
hyper = editor.hypernet


@torch.no_grad()
def joint_edit(facts, progress=None):
    keys = {m: [] for m in editor.modules}
    targets = []
    for batch in editor.batches(list(facts)):
        k_batch, g_batch = trace(editor.adapter, editor.modules, batch)
        d = 0
        for m in editor.modules:
            k, g = k_batch[m].float(), g_batch[m].float()
            pk, pg = hyper(m, k, g)
            d = d + value_differences(k, pk, pg, hyper.eta(m))
            keys[m].append(k)
        targets.append(d)
    D = torch.cat(targets).double() * scale
    K = {m: torch.cat(v).double() for m, v in keys.items()}
    lam = {m: float(hyper.lam(m)) for m in editor.modules}
    gram = sum(K[m] @ K[m].t() / lam[m] for m in editor.modules) + torch.eye(len(D), dtype=D.dtype)
    alpha = torch.linalg.solve(gram, D)
    print(f"{len(D)} answer tokens", file=sys.stderr)
    return EditHandle(model, {m: (K[m].t() @ alpha / lam[m]).float() for m in editor.modules})


editor.edit = joint_edit
report(editor, n, out)
