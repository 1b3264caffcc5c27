"""``malmen export``: re-store an editor with its hyper-network's low-rank factors in float16 (half the file),
optionally keeping the regulariser's key statistics with it (``--stats-data``)."""
from __future__ import annotations

import argparse

from ..formats import EDITOR_FILE
from ..methods import fraction, positive
from .common import UsageError, add_common, checked_out, checked_stats_data, load


def add_parser(sub) -> None:
    x = sub.add_parser("export", help="write an editor with its low-rank factors in float16 (half the file); no model "
                       "loaded unless --stats-data", formatter_class=sub.formatter_class)
    x.add_argument("--editor", required=True, help="editor directory (e.g. runs/x/best) or shipped editor name")
    x.add_argument("--out", required=True, help="directory for the exported editor, written atomically")
    x.add_argument("--factor-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the stored factors; loading casts them back to float32")
    x.add_argument("--stats-data", help="keep with the editor a regulariser shaped by the keys at the answer positions of "
                   "this fact file's locality prompts (its train part, the first --stats-texts; regulariser 'keys', "
                   "editor.keep_prior): the editor then edits with it, without the file; loads --model")
    x.add_argument("--stats-texts", type=int, default=4096, help="with --stats-data: how many of its facts")
    x.add_argument("--rephrase-share", type=fraction, default=0.0,
                   help="with --stats-data: blend into the kept shape, with this weight, how those facts' answer keys "
                        "move from prompt to rephrase (rephrases then get what their prompts get)")
    x.add_argument("--stats-rank", type=int, default=256,
                   help="with --stats-data: eigenpairs kept per module (and the diagonal of the rest)")
    x.add_argument("--lambda-scale", type=positive, help="store this factor on the learned regularisers with the "
                   "editor (its edits then use it; eval's --lambda-scale still overrides it) (default: the source's)")
    x.add_argument("--prior-mix", type=fraction, help="store this share of the regulariser's shape with the editor, "
                   "(1 - M) I + M P (eval's --prior-mix still overrides it) (default: the source's)")
    add_common(x)
    x.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import registry
    from ..export import export_editor

    try:
        registry.editor_config(args.editor)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    if args.stats_texts < 1 or args.stats_rank < 1:
        raise UsageError("--stats-texts and --stats-rank must be positive")
    stats_facts = checked_stats_data(args)
    checked_out(args.out, EDITOR_FILE)
    prior, hypernet = kept_prior(args, stats_facts) if stats_facts else (None, None)
    out = export_editor(args.editor, args.out, args.factor_dtype, args.command, prior, args.lambda_scale, args.prior_mix,
                        hypernet=hypernet)
    print(f"exported {args.editor} to {out} (factors in {args.factor_dtype}"
          + (f"; regulariser kept at rank {args.stats_rank}" if prior else "")
          + (f", rephrase share {args.rephrase_share:g}" if prior and args.rephrase_share else "")
          + (f"; lambda scale {args.lambda_scale:g}" if args.lambda_scale else "")
          + (f"; prior mix {args.prior_mix:g}" if args.prior_mix is not None else "") + ")")
    return 0


def kept_prior(args: argparse.Namespace, stats_facts: list) -> tuple[tuple[dict, dict], object]:
    """The editor's kept prior (``MalmenEditor.keep_prior``) from --stats-data, its tensors and record,
    and the editor's hyper-network (loaded for it, so the export does not read it again)."""
    from ..editor import MalmenEditor

    model, tok = load(args)
    editor = MalmenEditor.from_pretrained(args.editor, model, tok)
    editor.config.regulariser = "keys"
    editor.use_statistics_of(stats_facts, args.rephrase_share)
    moves = f" and their rephrases' key moves (share {args.rephrase_share:g})" if args.rephrase_share else ""
    editor.keep_prior(args.stats_rank, source=f"locality prompts of the first {args.stats_texts} facts of the train "
                      f"part of {args.stats_data}{moves}")
    return (editor.kept_prior, editor.metadata["kept_prior"]), editor.hypernet
