"""``malmen bench quality``: ES/GS/LS of several editors as the number of facts edited at once grows.

For every data file, target (counterfactual ``new`` or ``true`` answer), method and n, edits
``max(1, facts_per_point // n)`` consecutive groups of n held-out facts (each group into the
unedited model, reverted afterwards) and records every metric of evaluate.METRICS, unedited
beside edited, the edit time, the peak memory and, apart from the edit time, a method's one-time
preparation (``prepare_seconds``: MEMIT's key statistics, 0 when cached).  Writes
``results.json``, ``results.csv``, ``results.md`` and, when matplotlib is installed, ``results.png``
(ES, GS and LS against n, a row of panels per data file).
"""
from __future__ import annotations

import csv
import math
from io import StringIO
from pathlib import Path
from typing import Callable, Sequence

from .. import io
from ..evaluate import METRICS, evaluate
from ..facts import Fact


def run_quality(editors: dict[str, object], datasets: Sequence[tuple[str, str, Sequence[Fact]]], ns: Sequence[int],
                facts_per_point: int = 1024, generate: bool = True,
                log: Callable[[str], None] = print, texts: Sequence | None = None) -> list[dict]:
    """Rows of results, one per (dataset, target, method, n); n is capped by the facts available.

    ``datasets`` holds (name, target, facts) triples: the same file once per target.  ``texts``: token
    windows of ordinary text (perplexity.windows), whose perplexity each row gets as PPL.
    """
    from ..methods import prepare

    rows = []
    prepared = {method: prepare(editor) for method, editor in editors.items()}  # apart from edit time
    for data_name, target, facts in datasets:
        start = len(rows)
        cap = len(facts)
        usable = [n for n in ns if n <= cap]
        if len(usable) < len(ns):
            log(f"{data_name}: {cap} held-out facts; n capped at {cap} (skipping {[n for n in ns if n > cap]})")
        for n in usable:
            groups = max(1, min(facts_per_point // n, cap // n))
            unedited: dict = {}  # the unedited figures and trunk of each group, shared by the methods, freed per n
            for method, editor in editors.items():
                result = evaluate(editor, facts[: n * groups], n, generate=generate, unedited=unedited, texts=texts)
                row = {"data": data_name, "target": target, "method": method, "n": n, "groups": groups,
                       "held_out_facts": cap, "edit_seconds": result["edit_seconds"], "peak_rss_mb": result["peak_rss_mb"],
                       "prepare_seconds": prepared[method]}
                for key in METRICS:
                    if key in result:
                        row[key] = result[key]
                        row[f"before_{key}"] = result["before"][key]
                for key in ("fit", "room"):  # means over modules of the edit's report (solver.report)
                    if result.get(key):
                        row[key] = sum(result[key].values()) / len(result[key])
                rows.append(row)
                log(f"{data_name}/{target} {method} n={n}: ES {row['ES']:.3f} GS {row['GS']:.3f} LS {row['LS']:.3f} "
                    f"({row['edit_seconds']:.1f} s per edit)")
        order = {m: i for i, m in enumerate(editors)}
        rows[start:] = sorted(rows[start:], key=lambda r: (order[r["method"]], r["n"]))  # method by method
    return rows


def pivot(rows: list[dict]) -> list[str]:
    """A compact Markdown table: one line per (data, target, method), one column per n."""
    ns = sorted({r["n"] for r in rows})
    lines = ["| data | target | method | " + " | ".join(f"n = {n}" for n in ns) + " |",
             "| --- | --- | --- | " + " | ".join("---:" for _ in ns) + " |"]
    for data, target in dict.fromkeys((r["data"], r["target"]) for r in rows):
        # the unedited figures depend on n only through which facts its groups cover
        before = {r["n"]: f"{r['before_ES']:.2f} / {r['before_GS']:.2f} / 1" for r in rows
                  if (r["data"], r["target"]) == (data, target)}
        lines.append(f"| {data} | {target} | unedited | " + " | ".join(before.get(n, "") for n in ns) + " |")
        for method in dict.fromkeys(r["method"] for r in rows if (r["data"], r["target"]) == (data, target)):
            cells = {r["n"]: f"{r['ES']:.2f} / {r['GS']:.2f} / {r['LS']:.2f}" for r in rows
                     if (r["data"], r["target"], r["method"]) == (data, target, method)}
            lines.append(f"| {data} | {target} | {method} | " + " | ".join(cells.get(n, "") for n in ns) + " |")
    return lines


def write_outputs(rows: list[dict], out: str | Path, command: str) -> None:
    """results.json, .csv, .md (and .png with matplotlib) in ``out``.

    All text is formatted before anything is written, and each file is replaced atomically."""
    table = StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    lines = [f"Command: `{command}`", "",
             "| data | target | method | n | ES | GS | LS | ES_exact | GS_exact | LS_data | fit | room | edit s | prepare s | peak RSS MB | unedited ES/GS |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        fit, room = (f"{r[k]:.3f}" if k in r else "" for k in ("fit", "room"))
        lines.append(f"| {r['data']} | {r['target']} | {r['method']} | {r['n']} | {r['ES']:.3f} | {r['GS']:.3f} | {r['LS']:.3f} | "
                     f"{r.get('ES_exact', math.nan):.3f} | {r.get('GS_exact', math.nan):.3f} | {r.get('LS_data', math.nan):.3f} | {fit} | {room} | "
                     f"{r['edit_seconds']:.1f} | {r.get('prepare_seconds', 0.0):.1f} | {r.get('peak_rss_mb', math.nan):.0f} | "
                     f"{r['before_ES']:.3f}/{r['before_GS']:.3f} |")
    lines += ["", "ES / GS / LS by number of facts edited at once:", ""] + pivot(rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    io.write_json(out / "results.json", {"command": command, "rows": rows})
    io.write_text(out / "results.csv", table.getvalue())
    io.write_text(out / "results.md", "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    metrics = ["ES", "GS", "LS"]  # the headline metrics; every variant is in the CSV
    names = list(dict.fromkeys(r["data"] for r in rows))  # one row of panels per data file
    colours = {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    lines_of: dict[str, dict[tuple[str, str], list[dict]]] = {}  # data -> (target, method) -> its rows, in one pass
    for r in rows:
        lines_of.setdefault(r["data"], {}).setdefault((r["target"], r["method"]), []).append(r)
    fig, axes = plt.subplots(len(names), len(metrics), figsize=(3.2 * len(metrics), 3.2 * len(names)), squeeze=False)
    for panels, data in zip(axes, names):
        for ax, metric in zip(panels, metrics):
            for (target, method), line in lines_of[data].items():
                pts = sorted((r["n"], r[metric]) for r in line if metric in r)
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=colours[method], linestyle="-" if target == "new" else "--",
                            label=f"{method} ({target})")
            ax.set_xscale("log")
            ax.set_title(f"{metric} ({data})")
            ax.set_xlabel("facts edited at once")
            ax.set_ylim(-0.02, 1.02)
        panels[0].legend(fontsize=6)
    fig.tight_layout()
    try:
        with io.atomic_file(out / "results.png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
