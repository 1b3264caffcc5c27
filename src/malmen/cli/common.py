"""What the commands share: user errors, common options, input checks, loading, output.

Every command checks all of the user's input (fact files to the last record, editor names,
methods) before it loads a model, so a typo costs a second, not the half minute of a load.
Nothing here imports torch at module level.
"""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

DATA_HINT = "a fact file: zsRE (MEND or EasyEdit fields), CounterFact (EasyEdit or ROME), or JSONL with prompt/target"


class UsageError(Exception):
    """Bad user input: reported as one line, exit code 2."""


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default, unless it has none worth showing (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_common(sp: argparse.ArgumentParser, target: bool = True) -> None:
    """--model, --device, --dtype, --target, --seed, --format."""
    from ..registry import DEFAULT_MODEL

    sp.add_argument("--model", default=DEFAULT_MODEL, help="alias, HF directory/hub id, or .gguf file")
    sp.add_argument("--device", default="cpu", help="torch device of the LM, hyper-network and solver (cpu, cuda, cuda:1, ...)")
    sp.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="LM dtype; hyper-network and solver stay fp32")
    if target:
        sp.add_argument("--target", default="new", choices=["new", "true"], help="edit in the counterfactual (new) or the true answer")
    sp.add_argument("--seed", type=int, default=0, help="random seed")
    sp.add_argument("--format", default="auto", metavar="FORMAT",
                    help="fact file format: auto (detected from the fields), a format name, or counterfact-claims "
                         "(fact-checking edits derived from CounterFact)")


HYPER_PRECISIONS = ("fp32", "tf32", "bf16")  # precision.PRECISIONS, named here without importing torch


def add_hyper_precision(sp: argparse.ArgumentParser, help: str) -> None:
    """--hyper-precision: how the hyper-network's products run (precision.py)."""
    sp.add_argument("--hyper-precision", default="tf32", choices=HYPER_PRECISIONS, help=help)


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's strategies


DEVICE_NAME = re.compile(r"cpu|disk|mps|(cuda|xpu|npu|mlu|hpu)(:\d+)?")  # what accelerate places modules on


def add_device_map(sp: argparse.ArgumentParser) -> None:
    """--device-map: a model larger than one device, spread over all of them with accelerate."""
    sp.add_argument("--device-map", metavar="MAP",
                    help=f"spread the model over every visible device with accelerate: {', '.join(DEVICE_MAPS)}, or a "
                         "JSON file mapping module names to devices (as transformers' device_map); each edited module's "
                         "keys, sums and shift stay on its device. --device is then unused; not under torchrun")


def checked_device_map(args: argparse.Namespace, method) -> None:
    """Refuse a --device-map that cannot work, before anything loads; a JSON map is read into
    ``args.device_map``."""
    import json
    import os

    from ..methods import METHODS

    value = getattr(args, "device_map", None)
    if value is None:
        return
    if not method.device_map:
        fitting = ", ".join(name for name, m in METHODS.items() if m.device_map)
        raise UsageError(f"--device-map works with --method {fitting}, not --method {method.name}")
    from ..registry import classifier_head

    if classifier_head(args.model) is not None:
        raise UsageError(f"--device-map spreads a language model; {args.model} is a classifier head's small encoder "
                         "(use --device)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--device-map spreads one model over this machine's devices; under torchrun each process "
                         "holds the whole model (use --device cuda)")
    if value in DEVICE_MAPS:
        return
    if not value.endswith(".json"):
        raise UsageError(f"--device-map must be one of {', '.join(DEVICE_MAPS)} or a .json file, not {value!r}")
    try:
        with open(value) as f:
            mapping = json.load(f)
    except OSError as err:
        raise UsageError(f"{value}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{value}: not JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise UsageError(f"{value}: a device map is a JSON object of module name -> device")
    for module, device in mapping.items():
        index = isinstance(device, int) and not isinstance(device, bool) and device >= 0
        if not (index or isinstance(device, str) and DEVICE_NAME.fullmatch(device)):
            raise UsageError(f"{value}: field {module!r}: a device is a GPU index or a name (cuda:1, cpu, disk), "
                             f"not {device!r}")
    args.device_map = mapping


def add_method_options(sp: argparse.ArgumentParser) -> None:
    """--editor, --method and every method's own options (methods.py)."""
    from ..methods import METHODS, all_options

    sp.add_argument("--editor", help="trained editor: a directory or a shipped name (for methods that need none, "
                                     "it only names the layers to edit)")
    sp.add_argument("--method", choices=list(METHODS),
                    help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) +
                         " (default: the method the editor was trained for)")
    for option in all_options():
        sp.add_argument(option.flag, type=option.type, default=option.default, help=option.help)


def checked_method_options(args: argparse.Namespace, target: str | None = None) -> dict:
    """The methods' options by dest, as parsed and checked before anything loads; --stats-data
    stands there as the facts ``checked_stats_data`` read (with ``target`` and --format), so the
    method uses those, read once."""
    from ..methods import all_options

    options = {o.dest: getattr(args, o.dest) for o in all_options() if hasattr(args, o.dest)}
    stats_facts = checked_stats_data(args, target)
    if stats_facts is not None:
        options["stats_data"] = stats_facts
    return options


def checked_method(name: str | None, editor: str | None):
    """The method asked for, with its editor checked (no model loaded yet)."""
    from ..methods import method_for

    try:
        method = method_for(name, editor)
        method.check(editor)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    return method


def checked_stats_data(args: argparse.Namespace, target: str | None = None) -> list | None:
    """Read --stats-data (malmen's key statistics from a fact file's locality prompts) before
    anything loads: a bad record, or no locality prompt in the part used, stops here.  Returns the
    facts read (None without --stats-data), so a command that uses them reads the file once.
    ``target``: the answers read (default ``--target``; they place the rephrase moves)."""
    path, share = getattr(args, "stats_data", None), getattr(args, "rephrase_share", None)
    if path is None:
        if share:
            raise UsageError("--rephrase-share needs --stats-data (facts with rephrases)")
        return None
    facts = read_facts(path, target or args.target, split="train", limit=args.stats_texts, fmt=args.format)
    if not any(f.has_locality for f in facts):
        raise UsageError(f"{path}: no locality prompts among the first {len(facts)} facts of its train part "
                         "(--stats-data needs them)")
    if share and not any(f.rephrases for f in facts):
        raise UsageError(f"{path}: no rephrases among the first {len(facts)} facts of its train part "
                         "(--rephrase-share needs them)")
    return facts


def read_facts(path: str, target: str, split: str | None = None, limit: int | None = None,
               check_conflicts: bool = False, fmt: str = "auto") -> list:
    """The facts of a file (the first ``limit``), every one checked; a UsageError when none."""
    from ..datasets import load_facts

    facts = []
    for fact in load_facts(path, target=target, fmt=fmt, split=split, check_conflicts=check_conflicts):
        facts.append(fact)
        if limit is not None and len(facts) >= limit:
            break
    if not facts:
        raise UsageError(f"{path}: no facts{' in the ' + split + ' split' if split else ''}")
    return facts


def load(args: argparse.Namespace):
    """(model, tokenizer) of ``--model`` in ``--dtype`` on ``--device`` (or spread by ``--device-map``,
    checked first by ``checked_device_map``).  Under torchrun this process joins the group first
    (its device: ``cuda:LOCAL_RANK`` when ``--device cuda``)."""
    import torch

    from .. import distributed
    from ..models import load_model

    args.device = distributed.init_from_env(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    return load_model(args.model, dtype=dtype, device=args.device, device_map=getattr(args, "device_map", None))


def main_process() -> bool:
    """Whether this process prints and writes (rank 0 under torchrun; always without it)."""
    from .. import distributed

    return distributed.is_main()


def seed(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(getattr(args, "seed", 0))


def progress(total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="fact", dynamic_ncols=True, disable=None)


def write_result(path: str, result: dict) -> None:
    from ..io import write_json

    if not main_process():
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    print(f"wrote {path}")


def command_line(argv: list[str]) -> str:
    """The command as a user would type it again (``args.command`` of every command: benchmarks'
    results and editors' ``commands`` record it)."""
    return shlex.join(["malmen", *argv])


def checked_out(path: str | None, marker: str) -> None:
    """Refuse, before any heavy work, an output directory the command would replace whole though
    it did not write it (``io.check_replaceable``)."""
    if path is None:
        return
    from ..io import check_replaceable

    try:
        check_replaceable(path, marker)
    except ValueError as err:
        raise UsageError(str(err)) from None


def add_ppl_text(sp: argparse.ArgumentParser) -> None:
    """--ppl-text and --ppl-tokens (perplexity.py), for commands that evaluate edits."""
    from ..perplexity import LIMIT, WINDOW

    sp.add_argument("--ppl-text", metavar="FILE", help="also report the perplexity of this UTF-8 text (ordinary prose: "
                    "what an edit costs beyond the locality prompts), unedited and after each edit (PPL)")
    sp.add_argument("--ppl-tokens", type=int, default=LIMIT, help=f"with --ppl-text: its first N tokens, in windows of {WINDOW}")


def checked_text(args: argparse.Namespace) -> str | None:
    """--ppl-text's text, read before the model is loaded (a file that cannot serve is refused first)."""
    from ..perplexity import read_text

    if args.ppl_text is None:
        return None
    if args.ppl_tokens < 2:
        raise UsageError(f"--ppl-tokens must be at least 2, not {args.ppl_tokens}")
    try:
        return read_text(args.ppl_text)
    except ValueError as err:
        raise UsageError(str(err)) from None


def text_windows(args: argparse.Namespace, text: str | None, adapter) -> list | None:
    """``checked_text``'s text in token windows for ``adapter``'s model, refused (naming the file)
    before any edit when it is too short or the model does not predict text."""
    from ..perplexity import windows

    if text is None:
        return None
    if not adapter.predicts_text:
        raise UsageError(f"{args.ppl_text}: {adapter.refusal_of_text()}")
    try:
        texts = windows(adapter.tokenizer, text, limit=args.ppl_tokens)
    except ValueError as err:
        raise UsageError(f"{args.ppl_text}: {err}") from None
    return texts
