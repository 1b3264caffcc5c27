"""``malmen apply``: apply patches to their base model with one solve, and save the edited model."""
from __future__ import annotations

import argparse
import sys

from ..formats import MODEL_FILE
from .common import UsageError, checked_out, load, seed


def add_parser(sub) -> None:
    a = sub.add_parser("apply", help="apply edit patches (malmen edit --patch-out) to their base model at once",
                       formatter_class=sub.formatter_class)
    a.add_argument("patches", nargs="+", metavar="PATCH", help="patch directories, oldest first")
    a.add_argument("--model", help="the base model the patches were made for (default: the one they record)")
    a.add_argument("--device", default="cpu", help="torch device")
    a.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="LM dtype")
    a.add_argument("--supersede", action="store_true",
                   help="where two patches give one prompt different targets, the later patch wins (otherwise: an error)")
    a.add_argument("--out", required=True, help="directory for the edited model (save_pretrained), written atomically")
    a.add_argument("--seed", type=int, default=0, help="random seed")
    a.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..patches import Patch, PatchError, apply_patches

    checked_out(args.out, MODEL_FILE)
    metas = []
    for path in args.patches:  # JSON only: every patch is checked before the model is loaded
        try:
            metas.append(Patch.read_meta(path))
        except (ValueError, FileNotFoundError) as err:
            raise UsageError(str(err)) from None
    fingerprints = {m["editor"]["fingerprint"] for m in metas}
    if len(fingerprints) > 1:
        raise UsageError("the patches come from different editors; patches are summed only when one editor made them all")
    args.model = args.model or metas[0]["base_model"]["name"]
    seed(args)
    model, tok = load(args)
    patches = [Patch.load(path) for path in args.patches]
    from ..timing import timed

    try:
        with timed(args.device) as took:
            handle = apply_patches(model, patches, supersede=args.supersede, tokenizer=tok)
    except PatchError as err:
        raise UsageError(str(err)) from None
    facts = sum(len(p.facts) for p in patches)
    print(f"applied {len(patches)} patches ({facts} facts) with one solve in {took.seconds:.1f} s", file=sys.stderr)
    from ..models import save_model

    save_model(model, tok, args.out)
    print(f"saved the edited model to {args.out}")
    del handle
    return 0
