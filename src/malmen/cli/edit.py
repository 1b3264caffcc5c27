"""``malmen edit``: edit the facts of a file at once, show answers before and after, save the model."""
from __future__ import annotations

import argparse

from ..formats import MODEL_FILE, PATCH_FILE
from .common import (DATA_HINT, UsageError, add_common, add_device_map, add_method_options, checked_device_map,
                     checked_method, checked_method_options, checked_out, load, main_process, progress, seed)


def add_parser(sub) -> None:
    e = sub.add_parser("edit", help="edit facts into the model at once; optionally save the edited model",
                       formatter_class=sub.formatter_class)
    add_common(e)
    add_device_map(e)
    add_method_options(e)
    e.add_argument("--facts", required=True, help=DATA_HINT)
    e.add_argument("--out", help="directory for the edited model (save_pretrained, reloadable with transformers alone); "
                                 "written atomically")
    e.add_argument("--patch-out", metavar="DIR", help="also write the edit as a patch (patches.py): the facts' "
                   "contribution, to apply later with `malmen apply`, alone or with other patches")
    e.add_argument("--patch-dtype", default="fp16", choices=["fp16", "fp32"],
                   help="dtype of a patch's keys and value differences (a large patch holds fp64 sums instead)")
    e.add_argument("--patch-keys", action="store_true",
                   help="store the keys in the patch too (larger); by default `malmen apply` "
                        "traces them again from the facts with the base model")
    e.add_argument("--show", type=int, default=5, help="facts whose before/after answers are printed")
    e.add_argument("--dry-run", action="store_true",
                   help="check the facts and print the memory and time the edit will need; edit and write nothing")
    e.set_defaults(func=run)


class Checked:
    """What one pass over the fact file found: the count, the facts to show, one micro-batch."""

    def __init__(self, n: int, shown: list, probe: list):
        self.n, self.shown, self.probe = n, shown, probe


def check_file(args: argparse.Namespace, probe_size: int = 32) -> Checked:
    """Read every fact (conflicts refused) before anything heavy; keep what the command shows."""
    from ..datasets import load_facts

    n, shown, probe = 0, [], []
    for fact in load_facts(args.facts, target=args.target, fmt=args.format, check_conflicts=True):
        n += 1
        if len(shown) < args.show:
            shown.append(fact)
        if len(probe) < probe_size:
            probe.append(fact)
    return Checked(n, shown, probe)


def run(args: argparse.Namespace) -> int:
    method = checked_method(args.method, args.editor)
    checked_device_map(args, method)
    options = checked_method_options(args)
    if args.dry_run and not method.trained:
        raise UsageError(f"--dry-run estimates trained editors, not --method {method.name}")
    if args.patch_out and method.name != "malmen":
        raise UsageError(f"--patch-out needs a MALMEN editor (a patch is a share of its normal equation), not --method {method.name}")
    checked_out(args.out, MODEL_FILE)
    checked_out(args.patch_out, PATCH_FILE)
    checked = check_file(args)
    from ..datasets import load_facts
    from ..timing import timed

    seed(args)
    model, tok = load(args)
    editor = method.build(model, tok, args.editor, options)
    if args.dry_run:
        return dry_run(args, editor, checked)
    main = main_process()  # under torchrun every process edits its share; rank 0 prints and writes
    shown = checked.shown if main else []
    answers_before = answers(editor, [f.prompt for f in shown])
    bar = progress(checked.n if main else None, "editing")
    facts = load_facts(args.facts, target=args.target, fmt=args.format)
    with timed(editor.adapter.device) as took:
        if args.patch_out:  # the patch, then the edit it makes: the facts are traced once
            from ..patches import apply_patches, make_patch

            patch = make_patch(editor, facts, dtype=args.patch_dtype, store_keys=args.patch_keys, progress=bar.update)
            handle = apply_patches(model, [patch])
        else:
            handle = editor.edit(facts, progress=bar.update)
    bar.close()
    answers_after = answers(editor, [f.prompt for f in shown])
    if not main:
        return 0
    for fact, a0, a1 in zip(shown, answers_before, answers_after):
        print(f"{fact.prompt}\n  target: {fact.target}\n  before: {a0}\n  after:  {a1}")
    print(f"edited {checked.n} facts at once in {took.seconds:.1f} s ({checked.n / took.seconds:.1f} facts/s)")
    from ..evaluate import report_lines

    for line in report_lines(handle.report):
        print(line)
    if args.patch_out:
        patch.save(args.patch_out)
        print(f"saved the patch to {args.patch_out} ({patch.form}, {patch.nbytes / 2**20:.1f} MB; "
              f"apply it with malmen apply)")
    if args.out:
        from ..models import save_model

        save_model(model, tok, args.out)
        print(f"saved the edited model to {args.out} (load it with transformers' from_pretrained)")
    del handle
    return 0


def dry_run(args: argparse.Namespace, editor, checked: Checked) -> int:
    """Print the memory and time an edit of the file needs, from one micro-batch; edit nothing.

    An edit's time is tracing (per fact) plus one solve (per edit, whatever the number of facts),
    so the two are timed apart, after a warm-up on the same micro-batch, and the best of two
    timings is kept.  The normal equation keeps only KᵀK and KᵀD, so the peak memory of one
    micro-batch is, up to the allocator's growth over a long run, the peak of the whole edit."""
    from ..editor import trace
    from ..evaluate import peak_rss_mb
    from ..timing import timed

    probe = checked.probe[: editor.config.lm_batch_size]
    mb = 2.0 ** 20
    model_mb = sum(p.numel() * p.element_size() for p in editor.model.parameters()) / mb
    hyper_mb = sum(p.numel() * p.element_size() for p in editor.hypernet.parameters()) / mb
    sums_mb = editor.new_aggregator().sums_nbytes() / mb  # fp64 KᵀK and KᵀD (at most)
    device = editor.adapter.device
    editor.shifts(probe)  # warm-up on the very shapes that are timed
    trace_s, solve_s = [], []
    for _ in range(2):
        aggregator = editor.new_aggregator()
        with timed(device) as tracing:
            for batch in editor.batches(probe):
                editor.accumulate(aggregator, *trace(editor.adapter, editor.modules, batch, editor.config.keys))
        with timed(device) as solving:
            editor.solve(aggregator)
        trace_s.append(tracing.seconds)
        solve_s.append(solving.seconds)
    per_fact, solve = min(trace_s) / len(probe), min(solve_s)
    print(f"dry run: {checked.n} facts in {args.facts}, all readable; nothing edited or written")
    print(f"  model weights {model_mb:.0f} MB, hyper-network {hyper_mb:.0f} MB, sums KᵀK/KᵀD {sums_mb:.0f} MB "
          f"({len(editor.modules)} modules)")
    print(f"  peak memory of this process after one micro-batch of {len(probe)} facts: {peak_rss_mb():.0f} MB; "
          f"an edit holds nothing more for more facts (allocator growth aside: docs/BENCHMARKS.md)")
    print(f"  estimated time: {checked.n * per_fact + solve:.1f} s ({checked.n} facts at {1 / per_fact:.1f} facts/s, "
          f"plus {solve:.1f} s for the solve; {device})")
    return 0


def answers(editor, prompts: list[str], max_new_tokens: int = 8) -> list[str]:
    texts = [editor.adapter.continuations([p], max_new_tokens)[0] for p in prompts]
    return [" ".join(t.split()) or f"(only whitespace: {t!r})" for t in texts]

