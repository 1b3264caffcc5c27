"""``malmen bench sequential``: many facts as a stream of patches, as lifelong-editing papers run it.

n facts are cut into batches of ``patch_size``, and the model is edited three ways:
  patches     every batch is a patch traced at the base weights and saved; all are loaded and
              applied with one solve (their keys traced again, as ``malmen apply`` does);
  one batch   all n facts edited at once (the union: what the patches should equal);
  sequential  naive sequential MALMEN: each batch edited into the model the earlier ones left.
ES / GS / LS are measured over all n facts after the last batch (LS against the unedited model),
with the time per patch, the solve, and the patches' size on disk.  A second measurement times
adding one more patch to a model that already carries ``carried`` facts against editing those
facts alone.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

from ..editor import MalmenEditor, micro_batches
from ..evaluate import peak_rss_mb, snapshot
from ..facts import Fact
from ..patches import Patch, apply_patches, make_patch
from ..timing import timed


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def run_sequential(editor: MalmenEditor, facts: Sequence[Fact], patch_size: int, out: str | Path,
                   carry_facts: Sequence[Fact] = (), log: Callable[[str], None] = print) -> dict:
    """The three ways above on ``facts``; with ``carry_facts``, the adding measurement too."""
    out = Path(out)
    facts = list(facts)
    batches = list(micro_batches(facts, patch_size))
    adapter, bs = editor.adapter, editor.config.lm_batch_size
    trunk = adapter.trunk(editor.modules)
    before, reference = snapshot(adapter, facts, False, None, bs, trunk)
    rows = [{"way": "unedited", **{k: mean(v) for k, v in before.items()}}]

    def measure(way: str, **extra) -> None:
        trunk.rewind()
        after, _ = snapshot(adapter, facts, False, reference, bs, trunk)
        rows.append({"way": way, **{k: mean(v) for k, v in after.items()}, **extra})
        log(f"{way}: ES {rows[-1]['ES']:.3f} GS {rows[-1]['GS']:.3f} LS {rows[-1]['LS']:.3f}")

    # patches, traced at the base weights and saved; then loaded and applied as `malmen apply`
    # does (the keys traced again from the facts) with one solve
    names, patch_seconds, sizes = [], [], []
    for i, batch in enumerate(batches):
        with timed(adapter.device) as took:
            patch = make_patch(editor, batch)
            patch.save(out / "patches" / f"{i:04d}")
        names.append(out / "patches" / f"{i:04d}")
        patch_seconds.append(took.seconds)
        sizes.append(dir_bytes(names[-1]))
    with timed(adapter.device) as solve:
        handle = apply_patches(editor.model, [Patch.load(name) for name in names], tokenizer=adapter.tokenizer)
    measure("patches", patches=len(names), seconds_per_patch=mean(patch_seconds), solve_seconds=solve.seconds,
            patch_mb=mean(sizes) / 2**20, total_seconds=sum(patch_seconds) + solve.seconds)
    handle.revert()

    with timed(adapter.device) as took:
        handle = editor.edit(facts)
    measure("one batch", total_seconds=took.seconds)
    handle.revert()

    handles, seconds = [], []
    for batch in batches:
        with timed(adapter.device) as took:
            handles.append(editor.edit(batch))  # traced on the model the earlier batches left
        seconds.append(took.seconds)
    measure("sequential", seconds_per_batch=mean(seconds), total_seconds=sum(seconds))
    for h in reversed(handles):
        h.revert()

    result = {"n": len(facts), "patch_size": patch_size, "rows": rows, "peak_rss_mb": peak_rss_mb()}
    if carry_facts:
        result["adding"] = adding(editor, list(carry_facts), batches[0], patch_size, log)
    return result


def adding(editor: MalmenEditor, carried: list[Fact], new: list[Fact], patch_size: int,
           log: Callable[[str], None] = print) -> dict:
    """Seconds to add ``new`` as a patch to a model carrying ``carried`` (in patches of
    ``patch_size``) against editing ``new`` alone."""
    device = editor.adapter.device
    patches = [make_patch(editor, batch) for batch in micro_batches(carried, patch_size)]
    handle = apply_patches(editor.model, patches)
    editor.edit(new).revert()  # warm-up of the shapes timed below
    with timed(device) as alone:
        editor.edit(new).revert()
    with timed(device) as add:
        handle.add(make_patch(editor, new))
    handle.revert()
    log(f"adding {len(new)} facts to {len(carried)}: {add.seconds:.2f} s; editing them alone: {alone.seconds:.2f} s")
    return {"carried_facts": len(carried), "new_facts": len(new), "add_seconds": add.seconds,
            "alone_seconds": alone.seconds, "ratio": add.seconds / alone.seconds}


def table(result: dict) -> str:
    """The rows as Markdown, and the adding measurement."""
    lines = [f"n = {result['n']} facts in patches of {result['patch_size']}",
             "| way | ES | GS | LS | time | per patch / batch | patch size |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        if "total_seconds" not in r:  # the unedited model
            lines.append(f"| {r['way']} | {r['ES']:.3f} | {r['GS']:.3f} | 1 | | | |")
            continue
        per = r.get("seconds_per_patch", r.get("seconds_per_batch"))
        per = f"{per:.2f} s" if per is not None else ""
        size = f"{r['patch_mb']:.2f} MB" if "patch_mb" in r else ""
        lines.append(f"| {r['way']} | {r['ES']:.3f} | {r['GS']:.3f} | {r['LS']:.3f} | {r['total_seconds']:.1f} s | {per} | {size} |")
    if "adding" in result:
        a = result["adding"]
        lines.append(f"\nAdding {a['new_facts']} facts to a model carrying {a['carried_facts']}: {a['add_seconds']:.2f} s; "
                     f"editing them alone: {a['alone_seconds']:.2f} s (ratio {a['ratio']:.2f})")
    return "\n".join(lines)
