"""``malmen eval``: edit N facts at once (in groups) and report ES/GS/LS, edited beside unedited."""
from __future__ import annotations

import argparse
import sys

from .common import (DATA_HINT, UsageError, add_common, add_device_map, add_method_options, add_ppl_text,
                     checked_device_map, checked_method, checked_method_options, checked_text, load, main_process,
                     read_facts, seed, text_windows, write_result)


def add_parser(sub) -> None:
    v = sub.add_parser("eval", help="edit N facts at once and report ES/GS/LS, edited and unedited",
                       formatter_class=sub.formatter_class)
    add_common(v)
    add_device_map(v)
    add_method_options(v)
    v.add_argument("--data", required=True, help=DATA_HINT)
    v.add_argument("--split", choices=["train", "val", "test"], help="keep one part of the fixed zsRE split (held out: val, test)")
    v.add_argument("--n-edits", type=int, default=128, help="facts edited at once")
    v.add_argument("--groups", type=int, default=1, help="number of groups of n facts (each edited and reverted)")
    v.add_argument("--skip", type=int, default=0,
                   help="skip the first facts (e.g. 128: the validation facts malmen train selects its best checkpoint on)")
    v.add_argument("--no-generate", action="store_true", help="skip the greedy-generation metrics")
    add_ppl_text(v)
    v.add_argument("--out", help="results JSON")
    v.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate, table

    method = checked_method(args.method, args.editor)
    text = checked_text(args)
    checked_device_map(args, method)
    options = checked_method_options(args)
    facts = read_facts(args.data, args.target, split=args.split, limit=args.skip + args.n_edits * args.groups,
                       fmt=args.format)[args.skip:]
    if not facts:
        raise UsageError(f"{args.data}: no facts left after skipping {args.skip}")
    if len(facts) < args.n_edits:
        print(f"note: only {len(facts)} facts available; editing all of them at once", file=sys.stderr)
    seed(args)
    model, tok = load(args)
    editor = method.build(model, tok, args.editor, options)
    from ..methods import prepare

    prepared = prepare(editor)  # one-time work (MEMIT's key statistics), timed apart from the edits
    texts = text_windows(args, text, editor.adapter)
    result = evaluate(editor, facts, args.n_edits, generate=not args.no_generate,
                      progress=lambda m: print(m, file=sys.stderr), texts=texts)
    result.update(method=method.name, editor=str(args.editor), prepare_seconds=prepared, skip=args.skip, data=str(args.data),
                  target=args.target, split=args.split, model=args.model)
    if texts:
        result.update(ppl_text=str(args.ppl_text), ppl_tokens=sum(len(t) for t in texts))
    if not main_process():
        return 0
    print(table(result))
    if args.out:
        write_result(args.out, result)
    return 0
