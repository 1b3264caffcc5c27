from pathlib import Path

import torch

from malmen.timing import timed


def test_timed_synchronises_every_cuda_device_at_both_ends(monkeypatch):
    """Every visible GPU: a model spread over several by a device map works on all of them."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(str(device)))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with timed("cuda:0") as t:
        calls.append("work")
    assert calls == ["0", "1", "work", "0", "1"] and t.seconds >= 0
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
