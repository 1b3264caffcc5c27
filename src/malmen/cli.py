"""Command line: ``malmen train | edit | eval``.  ``malmen COMMAND --help`` for options.

Errors in user input (fact files, module names, editor directories) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DATA_HINT = "a fact file: zsRE (MEND or EasyEdit fields), CounterFact (EasyEdit or ROME), or JSONL with prompt/target"


class UsageError(Exception):
    """Bad user input: reported as one line, exit code 2."""


def _torch_setup(args) -> None:
    import torch

    torch.manual_seed(getattr(args, "seed", 0))


def _load(args):
    from .models import load_model

    import torch
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    return load_model(args.model, dtype=dtype, device=args.device)


def _facts(path: str, target: str, split: str | None = None, limit: int | None = None,
           check_conflicts: bool = False, fmt: str = "auto") -> list:
    from .datasets import load_facts

    facts = []
    for fact in load_facts(path, target=target, fmt=fmt, split=split, check_conflicts=check_conflicts):
        facts.append(fact)
        if limit is not None and len(facts) >= limit:
            break
    if not facts:
        raise UsageError(f"{path}: no facts{' in the ' + split + ' split' if split else ''}")
    return facts


def _progress(total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="fact", dynamic_ncols=True, disable=None)


# ---------------------------------------------------------------- train

def cmd_train(args) -> int:
    from .editor import EditorConfig, MalmenEditor
    from .hypernet import HyperConfig
    from .train import TrainConfig, Trainer

    if args.eta_factor != 1.0 and not (args.init_editor and args.modules):
        raise UsageError("--eta-factor needs --init-editor and --modules (it scales the steps of a moved editor)")
    _torch_setup(args)
    train = []
    for path in args.data:
        train += _facts(path, args.target, split=None if args.no_split else "train", fmt=args.format)
    val = _facts(args.val_data or args.data[0], args.target, split=None if (args.no_split or args.val_data) else "val", fmt=args.format)
    if not args.val_data and args.no_split:
        val = train[-args.val_n:]
        train = train[:-args.val_n]
    model, tok = _load(args)
    config = EditorConfig(modules=args.modules or [], aggregation={"mend": "sum"}.get(args.method, args.method),
                          hyper=HyperConfig(rank=args.rank, n_blocks=args.blocks),
                          lm_batch_size=args.lm_batch_size, hyper_batch_size=args.hyper_batch_size)
    try:
        if args.init_editor:  # its rank and aggregation win over the flags
            editor = MalmenEditor.from_pretrained(args.init_editor, model, tok)
            if args.modules and list(args.modules) != editor.modules:
                editor = editor.transplanted(args.modules, args.eta_factor)
            editor.config.lm_batch_size, editor.config.hyper_batch_size = args.lm_batch_size, args.hyper_batch_size
            config = editor.config
        else:
            editor = MalmenEditor(model, tok, config)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    tc = TrainConfig(n_edits=args.n_edits, steps=args.steps, lr=args.lr, scalar_lr=args.scalar_lr,
                     c_loc=args.c_loc, clip=args.clip, val_every=args.val_every, val_n=args.val_n,
                     seed=args.seed, max_minutes=args.max_minutes, cache_dtype=args.cache_dtype,
                     cache_budget_mb=args.cache_budget_mb)
    trainer = Trainer(editor, train, val, tc, args.out, log=lambda m: print(m, file=sys.stderr))
    if not trainer.resume() and args.init_editor:
        trainer.start_from(editor.metadata)
    print(f"training {config.aggregation} on {len(trainer.train)} facts ({len(trainer.val)} validation), "
          f"{tc.n_edits} facts per step, modules {editor.modules}", file=sys.stderr)
    from tqdm import tqdm
    bar = tqdm(total=tc.steps, initial=trainer.step_index, desc="meta-training", unit="step", dynamic_ncols=True, disable=None)
    log_path = Path(args.out) / "train_log.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if log_path.exists():  # after an interruption: drop the steps that will be redone
        kept = [line for line in log_path.read_text().splitlines() if line.strip()
                and json.loads(line).get("step", 0) <= trainer.step_index]
        log_path.write_text("".join(line + "\n" for line in kept))

    def progress(step, stats):
        bar.update(1)
        bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items() if k in ("gen_loss", "loc_loss", "val_ES", "val_GS", "val_LS")})
        with open(log_path, "a") as f:
            f.write(json.dumps(stats) + "\n")
        if "val_score" in stats:
            tqdm.write(f"step {step}: val ES {stats['val_ES']:.3f} GS {stats['val_GS']:.3f} LS {stats['val_LS']:.3f}", file=sys.stderr)

    result = trainer.fit(progress)
    bar.close()
    import statistics

    from .evaluate import peak_rss_mb

    times = [h["seconds"] for h in trainer.history[1:]] or [h["seconds"] for h in trainer.history]
    print(f"done: {result['steps']} steps, best validation score {result['best_score']:.3f}, "
          f"median {statistics.median(times) if times else float('nan'):.2f} s per step, peak RSS {peak_rss_mb():.0f} MB; "
          f"best editor in {Path(args.out) / 'best'}")
    return 0


# ---------------------------------------------------------------- edit

def cmd_edit(args) -> int:
    import itertools

    from .datasets import load_facts
    from .io import atomic_dir

    _torch_setup(args)
    shown = list(itertools.islice(load_facts(args.facts, target=args.target, fmt=args.format), args.show))
    if args.dry_run and args.method in ("ft", "ft-l"):
        raise UsageError(f"--dry-run estimates trained editors (malmen, mend), not --method {args.method}")
    model, tok = _load(args)
    try:
        editor = _editor(args.method, args.editor, args, model, tok)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    if args.dry_run:
        return _dry_run(args, editor, shown)
    answers_before = _answers(editor, [f.prompt for f in shown])
    # the file is streamed twice, never held: once to count (for the ETA), once to edit
    total = sum(1 for _ in load_facts(args.facts, target=args.target, fmt=args.format))
    bar, count = _progress(total, "editing"), [0]

    def progress(n: int) -> None:
        count[0] += n
        bar.update(n)

    start = time.perf_counter()
    handle = editor.edit(load_facts(args.facts, target=args.target, fmt=args.format, check_conflicts=True), progress=progress)
    bar.close()
    seconds, n_facts = time.perf_counter() - start, count[0]
    answers_after = _answers(editor, [f.prompt for f in shown])
    for fact, a0, a1 in zip(shown, answers_before, answers_after):
        print(f"{fact.prompt}\n  target: {fact.target}\n  before: {a0}\n  after:  {a1}")
    print(f"edited {n_facts} facts at once in {seconds:.1f} s ({n_facts / seconds:.1f} facts/s)")
    if args.out:
        with atomic_dir(args.out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        print(f"saved the edited model to {args.out}")
    del handle
    return 0


def _dry_run(args, editor, shown) -> int:
    """Count and check the facts, run one micro-batch, and print the memory and time an edit needs.

    The normal equation keeps only KᵀK and KᵀD, so the peak of one micro-batch is, up to the
    allocator's growth over a long run, the peak of the whole edit, whatever the number of facts."""
    from .datasets import load_facts
    from .evaluate import peak_rss_mb

    n, probe = 0, []  # one pass: count and check everything, keep one micro-batch
    for fact in load_facts(args.facts, target=args.target, fmt=args.format, check_conflicts=True):
        n += 1
        if len(probe) < editor.config.lm_batch_size:
            probe.append(fact)
    mb = 2.0 ** 20
    model_mb = sum(p.numel() * p.element_size() for p in editor.model.parameters()) / mb
    hyper_mb = sum(p.numel() * p.element_size() for p in editor.hypernet.parameters()) / mb
    sums_mb = sum(a * (a + b) * 8 for a, b in editor.hypernet.shapes.values()) / mb  # fp64 KᵀK and KᵀD
    editor.shifts(probe[:1])  # warm-up
    start = time.perf_counter()
    editor.shifts(probe)
    rate = len(probe) / (time.perf_counter() - start)
    print(f"dry run: {n} facts in {args.facts}, all readable; nothing edited or written")
    print(f"  model weights {model_mb:.0f} MB, hyper-network {hyper_mb:.0f} MB, sums KᵀK/KᵀD {sums_mb:.0f} MB "
          f"({len(editor.modules)} modules)")
    print(f"  peak memory of this process after one micro-batch of {len(probe)} facts: {peak_rss_mb():.0f} MB; "
          f"an edit holds nothing more for more facts (allocator growth aside: docs/BENCHMARKS.md)")
    print(f"  estimated time: {n / rate:.0f} s at {rate:.1f} facts/s (one micro-batch, {editor.adapter.device})")
    return 0


def _answers(editor, prompts, max_new_tokens: int = 8) -> list[str]:
    texts = [editor.adapter.continuations([p], max_new_tokens)[0] for p in prompts]
    return [" ".join(t.split()) or f"(only whitespace: {t!r})" for t in texts]


# ---------------------------------------------------------------- eval

def _write_result(path: str, result: dict) -> None:
    from .io import write_json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    print(f"wrote {path}")


def _editor(method: str | None, editor_dir: str | None, args, model, tok):
    """The editor an ``eval`` or ``bench quality`` asks for: a trained MALMEN/MEND editor, or a
    fine-tuning baseline configured by ``args.ft_steps``, ``args.ft_lr`` and ``args.ft_linf``."""
    from .baselines import FineTuneConfig, FineTuneEditor
    from .editor import MalmenEditor

    if method in ("ft", "ft-l"):
        linf = args.ft_linf if method == "ft-l" else None
        config = FineTuneConfig(steps=args.ft_steps, lr=args.ft_lr, linf=linf)
        if editor_dir:  # edit the same layers as the trained editor
            config.modules = MalmenEditor.read_config(editor_dir)["config"]["modules"]
        return FineTuneEditor(model, tok, config)
    if not editor_dir:
        raise UsageError(f"--method {method or 'malmen'} needs a trained editor (a directory or shipped name)")
    editor = MalmenEditor.from_pretrained(editor_dir, model, tok)
    wanted = {"malmen": "malmen", "mend": "sum", None: editor.config.aggregation}[method]
    if wanted != editor.config.aggregation:
        raise UsageError(f"{editor_dir} was trained with {editor.config.aggregation!r} aggregation; "
                         f"train one with --method {'sum' if wanted == 'sum' else 'malmen'} for --method {method}")
    return editor


def cmd_eval(args) -> int:
    from .evaluate import evaluate, table

    _torch_setup(args)
    facts = _facts(args.data, args.target, split=args.split, limit=args.skip + args.n_edits * args.groups, fmt=args.format)[args.skip:]
    if not facts:
        raise UsageError(f"{args.data}: no facts left after skipping {args.skip}")
    if len(facts) < args.n_edits:
        print(f"note: only {len(facts)} facts available; editing all of them at once", file=sys.stderr)
    model, tok = _load(args)
    editor = _editor(args.method, args.editor, args, model, tok)
    result = evaluate(editor, facts, args.n_edits, generate=not args.no_generate,
                      progress=lambda m: print(m, file=sys.stderr))
    result.update(method=args.method or getattr(editor.config, "aggregation", None), editor=str(args.editor), skip=args.skip,
                  data=str(args.data), target=args.target, split=args.split, model=args.model)
    print(table(result))
    if args.out:
        _write_result(args.out, result)
    return 0


# ---------------------------------------------------------------- classifier

def cmd_classifier(args) -> int:
    from .classifier import build, save_head, train_head
    from .datasets.fever import classifier_examples
    from .facts import read_records

    _torch_setup(args)

    def examples(path: str, limit: int | None) -> list[tuple[str, str]]:
        out = []
        for record in read_records(path):
            out += classifier_examples(record)
            if limit is not None and len(out) >= limit:
                break
        if not out:
            raise UsageError(f"{path}: no records")
        return out

    train, val = examples(args.data, args.limit), examples(args.val_data, None)
    model, tok = build(args.encoder)
    print(f"training the verdict head of {args.encoder} on {len(train)} claims ({len(val)} validation)", file=sys.stderr)
    stats = train_head(model, tok, train, val, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                       seed=args.seed, scope=args.train, log=lambda m: print(m, file=sys.stderr))
    info = {"encoder": args.encoder, "scope": args.train, "num_labels": 1, "labels": ["REFUTES", "SUPPORTS"],
            "trained_on": {"data": str(args.data), "val_data": str(args.val_data), "claims": len(train)},
            "epochs": args.epochs, "lr": args.lr, **stats}
    save_head(model, args.out, info, scope=args.train)
    print(f"validation accuracy {stats['val_accuracy']:.3f} (untrained head {stats['val_accuracy_before']:.3f}), "
          f"{stats['seconds']:.0f} s; head in {args.out} (use it as --model {args.out})")
    return 0


# ---------------------------------------------------------------- bench

def cmd_bench_quality(args) -> int:
    from .bench import run_quality, write_outputs

    _torch_setup(args)
    datasets = []
    for spec in args.data:
        name, _, path = spec.partition("=")
        if not path:
            raise UsageError(f"--data {spec!r}: expected NAME=FILE")
        for target in args.targets:
            facts = _facts(path, target, split=args.split, fmt=args.format)[args.skip:]
            if not facts:
                raise UsageError(f"{path}: no facts left after skipping {args.skip}")
            datasets.append((name, target, facts))
    model, tok = _load(args)
    editors = {}
    for spec in args.methods:
        method, _, editor_dir = spec.partition("=")
        editors[method] = _editor(method, editor_dir or None, args, model, tok)
    rows = run_quality(editors, datasets, args.n, args.facts_per_point, generate=not args.no_generate,
                       log=lambda m: print(m, file=sys.stderr))
    write_outputs(rows, args.out, "malmen " + " ".join(sys.argv[1:]))
    print((Path(args.out) / "results.md").read_text())
    return 0


def cmd_bench_speed(args) -> int:
    from .bench.speed import edit_speed, train_speed
    from .editor import EditorConfig, MalmenEditor
    from .evaluate import peak_rss_mb

    _torch_setup(args)
    import torch

    edit_facts = _facts(args.data, args.target, split=None if args.no_split else "val", limit=args.edit_facts,
                        fmt=args.format)
    model, tok = _load(args)
    editor = MalmenEditor.from_pretrained(args.editor, model, tok) if args.editor else MalmenEditor(model, tok, EditorConfig())
    result = {"command": "malmen " + " ".join(sys.argv[1:]), "model": args.model, "editor": args.editor,
              "torch_threads": torch.get_num_threads()}
    result.update(edit_speed(editor, edit_facts))
    print(f"edit: {result['edit_facts_per_s']:.1f} facts/s, limit {result['limit_facts_per_s']:.1f} facts/s, "
          f"ratio {result['edit_ratio']:.2f}")
    if args.train_n:
        train = _facts(args.data, args.target, split=None if args.no_split else "train", limit=max(args.train_n) * (args.steps + 1), fmt=args.format)
        result["train"] = []
        for n in args.train_n:
            r = train_speed(editor, train, n, args.steps, log=lambda m: print(m, file=sys.stderr))
            result["train"].append(r)
            print(f"train n={n}: {r['train_step_s']:.2f} s per step, bound {r['train_step_bound_s']:.2f} s, "
                  f"ratio {r['train_ratio']:.2f}")
        first = result["train"][0]
        result.update(train_step_s=first["train_step_s"], train_step_bound_s=first["train_step_bound_s"],
                      train_ratio=first["train_ratio"])
    result["peak_rss_mb"] = peak_rss_mb()
    _write_result(args.out, result)
    return 0


def cmd_bench_scale(args) -> int:
    from .bench.scale import run_scale

    result = run_scale(args.model, args.editor, args.n, args.lm_batch_size, log=print)
    result["command"] = "malmen " + " ".join(sys.argv[1:])
    print(f"peak RSS at n={args.n[-1]} / at n={args.n[0]}: {result['rss_ratio']:.3f}")
    _write_result(args.out, result)
    return 0


# ---------------------------------------------------------------- parser

def parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="malmen", description="Edit many facts into a language model at once (MALMEN).")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, target: bool = True):
        sp.add_argument("--model", default=DEFAULT_MODEL, help=f"alias, HF directory/hub id, or .gguf file (default {DEFAULT_MODEL})")
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="LM dtype; hyper-network and solver stay fp32")
        if target:
            sp.add_argument("--target", default="new", choices=["new", "true"], help="edit in the counterfactual (new) or the true answer")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--format", default="auto", metavar="FORMAT",
                        help="fact file format: auto (detected from the fields), a format name, or counterfact-claims "
                             "(fact-checking edits derived from CounterFact)")

    def ft_options(sp):
        # defaults: the best mean of ES/GS/LS at n = 128 on SmolLM2 among four settings (docs/RESULTS.md)
        sp.add_argument("--ft-steps", type=int, default=10, help="ft/ft-l: Adam steps on the facts")
        sp.add_argument("--ft-lr", type=float, default=5e-3, help="ft/ft-l: Adam learning rate")
        sp.add_argument("--ft-linf", type=float, default=5e-4, help="ft-l: bound on each weight change")

    t = sub.add_parser("train", help="meta-train an editor (hyper-network)")
    common(t)
    t.add_argument("--data", nargs="+", required=True, help=DATA_HINT + "; zsRE files use the fixed train split")
    t.add_argument("--val-data", help="validation facts (default: the fixed zsRE validation split of the first --data file)")
    t.add_argument("--no-split", action="store_true", help="use all of --data for training (validation: --val-data or its last facts)")
    t.add_argument("--out", required=True, help="run directory: best/, last/ (resumed from if present), train_log.jsonl")
    t.add_argument("--method", default="malmen", choices=["malmen", "mend", "sum"],
                   help="aggregation: malmen (normal equation) or mend (= sum, MEND's)")
    t.add_argument("--init-editor", help="continue meta-training this editor (directory or shipped name) with new settings; "
                   "a run directory's last/ still takes precedence")
    t.add_argument("--modules", nargs="+", help="edited linear layers (default: MLP output of the last 6 blocks); "
                   "with --init-editor, the editor is moved to these, each new one starting as the editor's nearest layer")
    t.add_argument("--eta-factor", type=float, default=1.0,
                   help="with --init-editor and new --modules: scale every step by this (e.g. 0.5 for twice the layers)")
    t.add_argument("--rank", type=int, default=256)
    t.add_argument("--blocks", type=int, default=2)
    t.add_argument("--n-edits", type=int, default=64, help="facts edited at once per training step")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--max-minutes", type=float, help="stop after this long (best checkpoint kept)")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--scalar-lr", type=float, default=1e-2, help="Adam lr of log-step and log-lambda")
    t.add_argument("--c-loc", type=float, default=1.0, help="weight of the locality loss")
    t.add_argument("--clip", type=float, default=1.0)
    t.add_argument("--val-every", type=int, default=50)
    t.add_argument("--val-n", type=int, default=128, help="validation facts edited at once")
    t.add_argument("--lm-batch-size", type=int, default=32, help="facts per LM micro-batch")
    t.add_argument("--hyper-batch-size", type=int, default=4096, help="tokens per hyper-network chunk")
    t.add_argument("--cache-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="dtype of the keys and value-gradients a step keeps (the hyper-network and solver run in fp32)")
    t.add_argument("--cache-budget-mb", type=float, help="spill them to memory-mapped files above this size")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("edit", help="edit facts into the model at once; optionally save the edited model")
    common(e)
    e.add_argument("--editor", help="editor directory or shipped editor name (for ft/ft-l: only names the layers)")
    e.add_argument("--method", choices=["malmen", "mend", "ft", "ft-l"],
                   help="malmen/mend: the trained editor (its aggregation must match; default: whatever it is); "
                        "ft/ft-l: fine-tuning baselines")
    ft_options(e)
    e.add_argument("--facts", required=True, help=DATA_HINT)
    e.add_argument("--out", help="directory for the edited model (save_pretrained); written atomically")
    e.add_argument("--show", type=int, default=5, help="facts whose before/after answers are printed")
    e.add_argument("--dry-run", action="store_true",
                   help="check the facts and print the memory and time the edit will need; edit and write nothing")
    e.set_defaults(func=cmd_edit)

    v = sub.add_parser("eval", help="edit N facts at once and report ES/GS/LS, edited and unedited")
    common(v)
    v.add_argument("--editor", help="editor directory or shipped editor name (for ft/ft-l: only names the layers)")
    v.add_argument("--data", required=True, help=DATA_HINT)
    v.add_argument("--split", choices=["train", "val"], help="keep one side of the fixed zsRE split")
    v.add_argument("--n-edits", type=int, default=128, help="facts edited at once")
    v.add_argument("--groups", type=int, default=1, help="number of groups of n facts (each edited and reverted)")
    v.add_argument("--skip", type=int, default=0,
                   help="skip the first facts (e.g. 128: the validation facts malmen train selects its best checkpoint on)")
    v.add_argument("--method", choices=["malmen", "mend", "ft", "ft-l"],
                   help="malmen/mend: the trained editor (its aggregation must match); ft/ft-l: fine-tuning baselines")
    ft_options(v)
    v.add_argument("--no-generate", action="store_true", help="skip the greedy-generation metrics")
    v.add_argument("--out", help="results JSON")
    v.set_defaults(func=cmd_eval)

    c = sub.add_parser("classifier", help="train the verdict head of a claim classifier on a frozen encoder "
                                          "(the base model for fact-checking edits)")
    c.add_argument("--encoder", default="minilm-l6", help="alias or directory of a BERT-style encoder (default minilm-l6)")
    c.add_argument("--data", required=True, help="CounterFact file (EasyEdit fields): true and false claims to learn from")
    c.add_argument("--val-data", required=True, help="CounterFact file for the validation accuracy")
    c.add_argument("--out", required=True, help="directory for head.safetensors and head.json")
    c.add_argument("--limit", type=int, help="at most this many training claims")
    c.add_argument("--train", default="head", choices=["head", "bitfit"],
                   help="head: pooler and verdict logit; bitfit: also the encoder's biases and LayerNorms")
    c.add_argument("--epochs", type=int, default=3)
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_classifier)

    b = sub.add_parser("bench", help="benchmarks (not tests): quality")
    bsub = b.add_subparsers(dest="bench", required=True)
    q = bsub.add_parser("quality", help="ES/GS/LS of several editors against n, unedited beside edited")
    common(q, target=False)
    q.add_argument("--methods", nargs="+", required=True,
                   help="METHOD=EDITOR for malmen/mend (e.g. malmen=smollm2-zsre), plain ft / ft-l for the baselines")
    q.add_argument("--data", nargs="+", required=True, help="NAME=FILE pairs of held-out facts")
    q.add_argument("--split", choices=["train", "val"], help="keep one side of the fixed split (held-out zsRE: val)")
    q.add_argument("--targets", nargs="+", choices=["new", "true"], default=["new", "true"],
                   help="edit in the counterfactual and/or the true answers (both by default)")
    q.add_argument("--skip", type=int, default=0, help="skip the first facts (those the editors' checkpoints were selected on)")
    q.add_argument("--n", nargs="+", type=int, default=[1, 16, 128, 1024, 4096, 16384])
    q.add_argument("--facts-per-point", type=int, default=1024, help="groups per point: this many facts // n (at least 1)")
    q.add_argument("--no-generate", action="store_true")
    ft_options(q)
    q.add_argument("--out", required=True, help="directory for results.json/.csv/.md/.png")
    q.set_defaults(func=cmd_bench_quality)
    sp = bsub.add_parser("speed", help="edit throughput and meta-training step time against the LM's own limit")
    common(sp)
    sp.add_argument("--editor", help="editor directory or shipped name (default: an untrained editor)")
    sp.add_argument("--data", required=True, help=DATA_HINT + " (zsRE: validation facts are edited, training facts train)")
    sp.add_argument("--no-split", action="store_true", help="use --data as it is for both (no zsRE split)")
    sp.add_argument("--edit-facts", type=int, default=512, help="facts edited at once for the throughput")
    sp.add_argument("--train-n", nargs="*", type=int, default=[64, 512], help="facts per meta-training step")
    sp.add_argument("--steps", type=int, default=3, help="timed meta-training steps per n (after one warm-up step)")
    sp.add_argument("--out", required=True, help="JSON file")
    sp.set_defaults(func=cmd_bench_speed)
    sc = bsub.add_parser("scale", help="peak memory and time of one edit of n synthetic facts (each n in its own process)")
    sc.add_argument("--model", default="tiny", help="'tiny' (a small random Llama) or a model name as elsewhere")
    sc.add_argument("--editor", help="editor directory or shipped name (default: an untrained editor)")
    sc.add_argument("--n", nargs="+", type=int, default=[1000, 10000, 100000, 1000000])
    sc.add_argument("--lm-batch-size", type=int, help="facts per LM micro-batch (default: the editor's)")
    sc.add_argument("--out", required=True, help="JSON file")
    sc.set_defaults(func=cmd_bench_scale)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .facts import FactError

    try:
        return args.func(args)
    except (FactError, UsageError) as err:
        print(f"malmen: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        # user-facing input problems (bad module names, over-long answers, wrong editor, ...);
        # MALMEN_DEBUG=1 shows the traceback instead
        if os.environ.get("MALMEN_DEBUG"):
            raise
        print(f"malmen: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("malmen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
