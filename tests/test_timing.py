from pathlib import Path

import torch

from malmen.timing import timed


def test_timed_synchronises_a_cuda_device_at_both_ends(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(str(device)))
    with timed("cuda:0") as t:
        calls.append("work")
    assert calls == ["cuda:0", "work", "cuda:0"] and t.seconds >= 0
    calls.clear()
    with timed("cpu"):
        pass
    assert calls == []


def test_model_work_is_timed_only_through_timed():
    """Reading the clock directly would time kernel launches on a GPU, not the work."""
    src = Path(__file__).resolve().parents[1] / "src" / "malmen"
    readers = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.py") if "perf_counter" in p.read_text())
    # timing.py is the clock; bench/scale.py times a whole child process on the CPU
    assert readers == ["bench/scale.py", "timing.py"]
