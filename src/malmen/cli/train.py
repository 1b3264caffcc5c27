"""``malmen train``: meta-train an editor; resumes from RUN_DIR/last."""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

from ..methods import REGULARISERS, count, fraction, nonnegative, positive
from .common import DATA_HINT, UsageError, add_common, add_hyper_precision, checked_stats_data, load, read_facts, seed

DEFAULT_RANK = 256  # a new editor's hyper-network rank (hypernet.HyperConfig's; here without importing torch)


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="meta-train an editor (hyper-network)", formatter_class=sub.formatter_class)
    add_common(t)
    t.add_argument("--data", nargs="+", required=True, help=DATA_HINT + "; zsRE files use the fixed train split")
    t.add_argument("--val-data", help="validation facts (default: the fixed zsRE validation split of the first --data file)")
    t.add_argument("--no-split", action="store_true", help="use all of --data for training (validation: --val-data or its last facts)")
    t.add_argument("--out", required=True, help="run directory: best/, last/ (resumed from if present), train_log.jsonl")
    t.add_argument("--method", choices=["malmen", "joint", "mend", "sum"],
                   help="aggregation: malmen (a normal equation per layer; the default of a new editor), joint (one "
                        "normal equation over the keys of all layers: their key dimensions together) or mend (= sum, "
                        "MEND's); with --init-editor, the editor's own unless given")
    t.add_argument("--init-editor", help="continue meta-training this editor (directory or shipped name) with new settings; "
                   "a run directory's last/ still takes precedence")
    t.add_argument("--modules", nargs="+", help="edited linear layers (default: MLP output of the last 6 blocks); "
                   "with --init-editor, the editor is moved to these, each new one starting as the editor's nearest layer")
    t.add_argument("--eta-factor", type=float, default=1.0,
                   help="with --init-editor and new --modules: scale every step by this (e.g. 0.5 for twice the layers)")
    t.add_argument("--keys", choices=["answer", "first", "subject"],
                   help="where keys are read: every answer token (answer, the paper's; the default of a new editor), "
                        "the position predicting the first answer token (first), or the prompt's last subject token "
                        "(subject, MEMIT's; the last prompt token where a fact names no subject); with --init-editor, "
                        "the editor's own unless given")
    t.add_argument("--regulariser", choices=REGULARISERS,
                   help="shape of the normal equation's regulariser lambda P: identity (the paper's; the default of "
                        "a new editor) or keys (P = the keys' second moment over text the model samples, cached in "
                        "~/.cache/malmen); with --init-editor, the editor's own unless given")
    t.add_argument("--stats-data", help="with --regulariser keys: take the key statistics at the answer positions of "
                   "this fact file's locality prompts (its train part, the first --stats-texts; the same file must "
                   "be given when the editor edits, or kept with it by malmen export --stats-data), not from text "
                   "the model samples")
    t.add_argument("--stats-texts", type=int, default=512, help="texts (or --stats-data facts) for the key statistics")
    t.add_argument("--rephrase-share", type=fraction, default=0.0,
                   help="with --stats-data: blend into the regulariser's shape, with this weight, how those facts' "
                        "answer keys move from prompt to rephrase (rephrases then get what their prompts get)")
    t.add_argument("--prior-mix", type=fraction, help="with --regulariser keys: P = (1 - mix) I + mix E[k kᵀ] (default 1)")
    t.add_argument("--rank", type=int, help="rank of the hyper-network's blocks (the paper: 1920 on GPT-J); with "
                   "--init-editor, a higher rank widens the editor's blocks, the same shifts at the start "
                   "(default: 256, or the editor's)")
    t.add_argument("--blocks", type=int, default=2, help="residual blocks of the hyper-network")
    t.add_argument("--n-edits", type=count, nargs="+", default=[64],
                   help="facts edited at once per training step; several: the steps cycle through them (a mix of n)")
    t.add_argument("--steps", type=int, default=1000, help="train until this step (counted over resumes)")
    t.add_argument("--max-minutes", type=positive, help="stop after this long (best checkpoint kept)")
    t.add_argument("--lr", type=nonnegative, default=1e-4, help="Adam lr of the hyper-network's weights")
    t.add_argument("--scalar-lr", type=nonnegative, default=1e-2, help="Adam lr of log-step, log-lambda and lambda's exponent")
    t.add_argument("--c-loc", type=nonnegative, default=1.0, help="weight of the locality loss")
    t.add_argument("--c-edit", type=nonnegative, default=0.0,
                   help="weight of the edit prompts' own loss beside the rephrases' (0: rephrases only, the paper's)")
    t.add_argument("--first-token-weight", type=positive, default=1.0,
                   help="weight of each fact's first answer token against 1 for the others in the answer losses "
                        "(1: a plain mean; the first token carries the new fact)")
    t.add_argument("--clip", type=positive, default=1.0, help="global gradient-norm clip")
    t.add_argument("--val-every", type=count, default=50, help="validate (and checkpoint) every this many steps")
    t.add_argument("--val-n", type=count, default=128, help="validation facts edited at once")
    t.add_argument("--lm-batch-size", type=int, default=32, help="facts per LM micro-batch")
    t.add_argument("--hyper-batch-size", type=int, default=4096, help="tokens per hyper-network chunk")
    t.add_argument("--cache-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="dtype of the keys and value-gradients a step keeps, never wider than traced (the "
                   "hyper-network and solver read them in fp32)")
    add_hyper_precision(t, "the hyper-network's products: tf32 runs them on a GPU's tensor cores (fp32 elsewhere), "
                           "bf16 rounds their operands (docs/BENCHMARKS.md gives the cost of each)")
    t.add_argument("--cache-budget-mb", type=float, help="spill them to memory-mapped files above this size")
    t.add_argument("--trunk-store", metavar="DIR",
                   help="keep the hidden states entering the lowest edited block here, across steps and runs: a "
                        "prompt seen before skips the frozen blocks (rebuilt when the model or the modules change)")
    t.add_argument("--trunk-dtype", default="fp16", choices=["fp16", "fp32"], help="dtype of the stored hidden states")
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.eta_factor != 1.0 and not (args.init_editor and args.modules):
        raise UsageError("--eta-factor needs --init-editor and --modules (it scales the steps of a moved editor)")
    if args.init_editor:
        from ..registry import editor_config

        try:
            rank = editor_config(args.init_editor)["config"].get("hyper", {}).get("rank", DEFAULT_RANK)
        except (ValueError, FileNotFoundError) as err:
            raise UsageError(str(err)) from None
        if args.rank is not None and args.rank < rank:
            raise UsageError(f"--rank {args.rank}: {args.init_editor} has rank {rank}; an editor can only be widened")
    train = []
    for path in args.data:
        train += read_facts(path, args.target, split=None if args.no_split else "train", fmt=args.format)
    val = read_facts(args.val_data or args.data[0], args.target,
                     split=None if (args.no_split or args.val_data) else "val", fmt=args.format)
    if not args.val_data and args.no_split:
        val = train[-args.val_n:]
        train = train[:-args.val_n]
    stats_facts = checked_stats_data(args)
    seed(args)
    model, tok = load(args)
    trainer = build_trainer(args, model, tok, train, val)
    trainer.editor.use_statistics_of(stats_facts, args.rephrase_share)
    trainer.editor.corpus = dataclasses.replace(trainer.editor.corpus, texts=args.stats_texts)
    return fit(args, trainer)


def build_trainer(args: argparse.Namespace, model, tok, train: list, val: list):
    """A Trainer for a new editor, an editor continued (``--init-editor``) or a run resumed."""
    from ..editor import EditorConfig, MalmenEditor
    from ..hypernet import HyperConfig
    from ..train import TrainConfig, Trainer

    try:
        aggregation = {"mend": "sum"}.get(args.method, args.method)
        if args.init_editor:  # its aggregation, keys and rank unless given (a rank can only grow)
            editor = MalmenEditor.from_pretrained(args.init_editor, model, tok)
            if aggregation:
                editor.config.aggregation = aggregation
            if args.modules and list(args.modules) != editor.modules:
                editor = editor.transplanted(args.modules, args.eta_factor)
            if args.rank is not None and args.rank != editor.config.hyper.rank:
                editor = editor.widened(args.rank)
            editor.config.lm_batch_size, editor.config.hyper_batch_size = args.lm_batch_size, args.hyper_batch_size
            editor.config.hyper_precision = args.hyper_precision
            if args.keys:
                editor.config.keys = args.keys
            if args.regulariser:
                editor.config.regulariser = args.regulariser
            if args.prior_mix is not None:
                editor.config.prior_mix = args.prior_mix
            editor.config.check()
        else:
            config = EditorConfig(modules=args.modules or [], aggregation=aggregation or "malmen",
                                  hyper=HyperConfig(rank=args.rank or DEFAULT_RANK, n_blocks=args.blocks),
                                  lm_batch_size=args.lm_batch_size, hyper_batch_size=args.hyper_batch_size,
                                  keys=args.keys or "answer", hyper_precision=args.hyper_precision,
                                  regulariser=args.regulariser or "identity",
                                  prior_mix=1.0 if args.prior_mix is None else args.prior_mix)
            editor = MalmenEditor(model, tok, config)
        n_edits = args.n_edits[0] if len(args.n_edits) == 1 else list(args.n_edits)
        tc = TrainConfig(n_edits=n_edits, steps=args.steps, lr=args.lr, scalar_lr=args.scalar_lr,
                         c_loc=args.c_loc, c_edit=args.c_edit, first_token_weight=args.first_token_weight, clip=args.clip,
                         val_every=args.val_every, val_n=args.val_n,
                         seed=args.seed, max_minutes=args.max_minutes, cache_dtype=args.cache_dtype,
                         cache_budget_mb=args.cache_budget_mb, trunk_store=args.trunk_store, trunk_dtype=args.trunk_dtype)
        trainer = Trainer(editor, train, val, tc, args.out, log=lambda m: print(m, file=sys.stderr))
        resumed = trainer.resume()
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    if not resumed and args.init_editor:
        trainer.start_from(editor.metadata)
    trainer.record(args.command)
    return trainer


def fit(args: argparse.Namespace, trainer) -> int:
    """Train with a progress bar and one line of train_log.jsonl per step."""
    from tqdm import tqdm

    from ..evaluate import peak_rss_mb

    from .common import main_process

    editor, tc = trainer.editor, trainer.config
    main = main_process()  # under torchrun every process trains on its share; rank 0 logs and writes
    if not main:
        trainer.fit()
        return 0
    print(f"training {editor.config.aggregation} on {len(trainer.train)} facts ({len(trainer.val)} validation), "
          f"{' / '.join(map(str, trainer.sizes))} facts per step, modules {editor.modules}", file=sys.stderr)
    bar = tqdm(total=tc.steps, initial=trainer.step_index, desc="meta-training", unit="step", dynamic_ncols=True, disable=None)
    log_path = Path(args.out) / "train_log.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if log_path.exists():  # after an interruption: drop the steps that will be redone
        kept = [line for line in log_path.read_text().splitlines() if line.strip()
                and json.loads(line).get("step", 0) <= trainer.step_index]
        log_path.write_text("".join(line + "\n" for line in kept))

    def progress(step: int, stats: dict) -> None:
        bar.update(1)
        bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items() if k in ("gen_loss", "loc_loss", "val_ES", "val_GS", "val_LS")})
        with open(log_path, "a") as f:
            f.write(json.dumps(stats) + "\n")
        if "val_score" in stats:
            tqdm.write(f"step {step}: val ES {stats['val_ES']:.3f} GS {stats['val_GS']:.3f} LS {stats['val_LS']:.3f}", file=sys.stderr)

    result = trainer.fit(progress)
    bar.close()
    times = [h["seconds"] for h in trainer.history[1:]] or [h["seconds"] for h in trainer.history]
    print(f"done: {result['steps']} steps, best validation score {result['best_score']:.3f}, "
          f"median {statistics.median(times) if times else float('nan'):.2f} s per step, peak RSS {peak_rss_mb():.0f} MB; "
          f"best editor in {Path(args.out) / 'best'}")
    return 0
