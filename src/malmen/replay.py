"""Skip the blocks below the lowest edited layer when their output is already known.

An edit changes only the edited layers, so every block below the lowest edited one computes
the same output before and after the edit.  ``record`` keeps the output of the last unchanged
block during one forward; ``replay`` swaps the unchanged blocks for stand-ins that return that
output without computing anything.  Nothing here depends on the architecture: blocks are only
assumed to be called in order, each consuming the previous one's output.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from torch import nn


class _Replayed(nn.Module):
    def __init__(self, output: Any):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


class Recording:
    output: Any = None


@contextmanager
def record(blocks: nn.ModuleList, upto: int) -> Iterator[Recording]:
    """Keep the output of ``blocks[upto - 1]`` (the last block below the edits) for a later replay."""
    rec = Recording()
    if upto <= 0:
        yield rec
        return

    def hook(module, inputs, output):
        rec.output = output

    handle = blocks[upto - 1].register_forward_hook(hook)
    try:
        yield rec
    finally:
        handle.remove()


@contextmanager
def replay(blocks: nn.ModuleList, upto: int, rec: Recording) -> Iterator[None]:
    """Run with ``blocks[:upto]`` replaced by stand-ins returning the recorded output."""
    if upto <= 0 or rec.output is None:
        yield
        return
    originals = [blocks[i] for i in range(upto)]
    stand_in = _Replayed(rec.output)
    for i in range(upto):
        blocks[i] = stand_in
    try:
        yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


class TrunkCache:
    """Record the unchanged trunk on a sequence of forwards, then replay it on the same sequence.

        trunk = TrunkCache(blocks, upto)
        for b in batches:  with trunk.step(): logits_before(b)     # records
        trunk.rewind()                                            # ... apply an edit ...
        for b in batches:  with trunk.step(): logits_after(b)      # replays, same order
    """

    def __init__(self, blocks: nn.ModuleList, upto: int):
        self.blocks, self.upto = blocks, upto
        self.recordings: list[Recording] = []
        self.replaying, self.position = False, 0

    @contextmanager
    def step(self) -> Iterator[None]:
        if not self.replaying:
            with record(self.blocks, self.upto) as rec:
                yield
            self.recordings.append(rec)
        else:
            rec = self.recordings[self.position]
            self.position += 1
            with replay(self.blocks, self.upto, rec):
                yield

    def rewind(self) -> None:
        self.replaying, self.position = True, 0
