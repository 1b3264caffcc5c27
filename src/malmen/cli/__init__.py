"""Command line: ``malmen train | edit | apply | eval | bench | classifier | export``; ``malmen COMMAND --help``.

Each command lives in a module of its own; every method is reached through ``malmen.methods``.
Errors in user input (fact files, module names, editors, methods) print one line and exit 2,
before any model is loaded.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import apply, bench, classifier, edit, evaluate, export, train
from .common import HelpFormatter, UsageError, command_line

COMMANDS = (train, edit, apply, evaluate, bench, classifier, export)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="malmen", description="Edit many facts into a language model at once (MALMEN).",
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.formatter_class = HelpFormatter
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    code = run(argv)
    if "torch.distributed" in sys.modules:  # under torchrun: end without the interpreter's teardown
        from ..distributed import finish

        return finish(code)
    return code


def run(argv: list[str] | None = None) -> int:
    """The command's exit status (2 for bad input, 130 when interrupted)."""
    args = parser().parse_args(argv)
    args.command = command_line(sys.argv[1:] if argv is None else argv)
    from ..facts import FactError

    try:
        return args.func(args)
    except (FactError, UsageError) as err:
        print(f"malmen: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        # user-facing input problems found late (over-long answers, an editor for another model, ...);
        # MALMEN_DEBUG=1 shows the traceback instead
        if os.environ.get("MALMEN_DEBUG"):
            raise
        print(f"malmen: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("malmen: interrupted", file=sys.stderr)
        return 130


__all__ = ["main", "parser", "UsageError"]
