"""``malmen classifier``: train the verdict head of a claim classifier on a frozen encoder."""
from __future__ import annotations

import argparse
import sys

from ..formats import HEAD_FILE
from .common import UsageError, checked_out, seed


def add_parser(sub) -> None:
    c = sub.add_parser("classifier", help="train the verdict head of a claim classifier on a frozen encoder "
                                          "(the base model for fact-checking edits)", formatter_class=sub.formatter_class)
    c.add_argument("--encoder", default="minilm-l6", help="alias or directory of a BERT-style encoder")
    c.add_argument("--data", required=True, help="CounterFact file (EasyEdit fields): true and false claims to learn from")
    c.add_argument("--val-data", required=True, help="CounterFact file for the validation accuracy")
    c.add_argument("--out", required=True, help="directory for head.safetensors and head.json")
    c.add_argument("--limit", type=int, help="at most this many training claims")
    c.add_argument("--train", default="head", choices=["head", "bitfit"],
                   help="head: pooler and verdict logit; bitfit: also the encoder's biases and LayerNorms")
    c.add_argument("--epochs", type=int, default=3, help="passes over the training claims")
    c.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    c.add_argument("--batch-size", type=int, default=32, help="claims per batch")
    c.add_argument("--seed", type=int, default=0, help="random seed (data order)")
    c.set_defaults(func=run)


def examples(path: str, limit: int | None) -> list[tuple[str, str]]:
    """(claim, verdict) pairs of a CounterFact file, every record checked."""
    from ..datasets.fever import classifier_examples
    from ..facts import read_records

    out = []
    for record in read_records(path):
        out += classifier_examples(record)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise UsageError(f"{path}: no records")
    return out


def run(args: argparse.Namespace) -> int:
    checked_out(args.out, HEAD_FILE)
    train, val = examples(args.data, args.limit), examples(args.val_data, None)
    seed(args)
    from ..classifier import build, save_head, train_head

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
