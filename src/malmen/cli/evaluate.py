"""``malmen eval``: edit N facts at once (in groups) and report ES/GS/LS, edited beside unedited."""
from __future__ import annotations

import argparse
import sys

from ..perplexity import LIMIT, WINDOW, read_text, windows
from .common import (DATA_HINT, UsageError, add_common, add_device_map, add_method_options, checked_device_map,
                     checked_method, checked_stats_data, load, main_process, method_options, read_facts, seed, write_result)


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
    v.add_argument("--ppl-text", metavar="FILE", help="also report the perplexity of this UTF-8 text (ordinary prose: "
                   "what the edit costs beyond the locality prompts), unedited and after each group's edit (PPL)")
    v.add_argument("--ppl-tokens", type=int, default=LIMIT, help="with --ppl-text: its first N tokens, in windows of "
                   f"{WINDOW}")
    v.add_argument("--out", help="results JSON")
    v.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate, table

    method = checked_method(args.method, args.editor)
    text = checked_text(args)
    checked_device_map(args, method)
    checked_stats_data(args)
    facts = read_facts(args.data, args.target, split=args.split, limit=args.skip + args.n_edits * args.groups,
                       fmt=args.format)[args.skip:]
    if not facts:
        raise UsageError(f"{args.data}: no facts left after skipping {args.skip}")
    if len(facts) < args.n_edits:
        print(f"note: only {len(facts)} facts available; editing all of them at once", file=sys.stderr)
    seed(args)
    model, tok = load(args)
    editor = method.build(model, tok, args.editor, method_options(args))
    from ..methods import prepare

    prepared = prepare(editor)  # one-time work (MEMIT's key statistics), timed apart from the edits
    try:
        texts = windows(tok, text, limit=args.ppl_tokens) if text is not None else None
        if texts:
            editor.adapter.text_logprobs(texts[:1])  # a model that does not predict text is refused before any edit
    except ValueError as err:
        raise UsageError(f"{args.ppl_text}: {err}") from None
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


def checked_text(args: argparse.Namespace) -> str | None:
    """--ppl-text's text, read before the model is loaded (a file that cannot serve is refused first)."""
    if args.ppl_text is None:
        return None
    if args.ppl_tokens < 2:
        raise UsageError(f"--ppl-tokens must be at least 2, not {args.ppl_tokens}")
    try:
        return read_text(args.ppl_text)
    except ValueError as err:
        raise UsageError(str(err)) from None
