"""``malmen export``: re-store an editor with its hyper-network's low-rank factors in float16 (half the file)."""
from __future__ import annotations

import argparse

from ..formats import EDITOR_FILE
from .common import UsageError, checked_out


def add_parser(sub) -> None:
    x = sub.add_parser("export", help="write an editor with its low-rank factors in float16 (half the file); no model loaded",
                       formatter_class=sub.formatter_class)
    x.add_argument("--editor", required=True, help="editor directory (e.g. runs/x/best) or shipped editor name")
    x.add_argument("--out", required=True, help="directory for the exported editor, written atomically")
    x.add_argument("--factor-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the stored factors; loading casts them back to float32")
    x.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import registry
    from ..export import export_editor

    try:
        registry.editor_config(args.editor)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    checked_out(args.out, EDITOR_FILE)
    out = export_editor(args.editor, args.out, args.factor_dtype, args.command)
    print(f"exported {args.editor} to {out} (factors in {args.factor_dtype})")
    return 0
