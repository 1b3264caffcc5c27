"""bench/quality.py output files: complete, and never half-written."""
import json

import pytest

from malmen.bench.quality import pivot, write_outputs


def row(method, n, es):
    return {"data": "zsre", "target": "new", "method": method, "n": n, "ES": es, "GS": es / 2, "LS": 0.9,
            "edit_seconds": 1.5, "before_ES": 0.1, "before_GS": 0.1}


def test_write_outputs_writes_every_file(tmp_path):
    rows = [row("malmen", 1, 0.9), row("malmen", 16, 0.8), row("ft", 1, 1.0)]
    write_outputs(rows, tmp_path / "out", "malmen bench quality ...")
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["rows"] == rows and data["command"] == "malmen bench quality ..."
    csv_lines = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("data,target,method,n,ES") and len(csv_lines) == 4
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| zsre | new | malmen | 0.90 / 0.45 / 0.90 | 0.80 / 0.40 / 0.90 |" in md
    assert "| zsre | new | ft | 1.00 / 0.50 / 0.90 |  |" in pivot(rows)


def test_failed_write_leaves_the_old_files_and_no_temporaries(tmp_path):
    out = tmp_path / "out"
    write_outputs([row("malmen", 1, 0.9)], out, "first")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = row("malmen", 16, 0.5)
    del broken["edit_seconds"]  # the Markdown table needs it
    with pytest.raises(KeyError):
        write_outputs([row("malmen", 1, 0.9), broken], out, "second")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched, no temporaries
