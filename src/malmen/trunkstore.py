"""Hidden states below the edits, kept on disk across meta-training steps.

Every block below the lowest edited layer is frozen and never edited, so the hidden state that
enters the lowest edited block depends on the tokens of a sequence alone.  Meta-training runs the
same edit, rephrase and locality prompts epoch after epoch; ``TrunkStore`` keeps each sequence's
hidden state there once it has been computed and, for a batch whose every row is stored, replaces
the frozen blocks by a stand-in that returns the stored states (``replay.replay``).  A step then
runs only the edited blocks on the LM side.

    store = TrunkStore("runs/x/trunk", model, blocks, upto=24)
    with store.step(batch):          # records what is missing, replays when all rows are stored
        logits = adapter.answer_logits(batch)

Rows are keyed by their token ids, so new data only adds rows.  A manifest ties the store to the
model (a fingerprint of the frozen blocks' weights), the block it stops at and its dtype; a store
that does not match is emptied and rebuilt.  States are saved in fp16 by default (half the disk
of fp32; the test bounds the meta-gradient's change) or fp32 (exact up to batching order).  The
data file only grows; the index is rewritten atomically (``flush``, once per training step) after
the data it points to is on disk.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from . import io
from .replay import Recording, record, replay

FORMAT = "malmen-trunk-store"
DTYPES = {"fp16": (torch.float16, np.float16), "fp32": (torch.float32, np.float32)}


def trunk_fingerprint(blocks: nn.ModuleList, upto: int, per_block: int = 16) -> list[float]:
    """A few weights of every frozen block at fixed positions: which model computed the states."""
    out = []
    for block in list(blocks)[:upto]:
        for p in block.parameters():
            flat = p.detach().flatten()
            idx = torch.linspace(0, flat.numel() - 1, min(per_block, flat.numel())).long().to(flat.device)
            out.extend(float(x) for x in flat[idx].float().cpu())
            break  # the first parameter of each block is enough to tell models apart
    return out


def row_key(ids: torch.Tensor) -> str:
    return hashlib.blake2b(ids.to(torch.int64).cpu().numpy().tobytes(), digest_size=16).hexdigest()


class _Stop(Exception):
    """Raised after the last frozen block: filling the store needs nothing above it."""


class TrunkStore:
    """Hidden states entering ``blocks[upto]`` of ``model``, per token sequence, in ``directory``."""

    def __init__(self, directory: str | Path, model: nn.Module, blocks: nn.ModuleList, upto: int, dtype: str = "fp16"):
        if dtype not in DTYPES:
            raise ValueError(f"trunk store dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.dir, self.model, self.blocks, self.upto, self.dtype = Path(directory), model, blocks, upto, dtype
        self.torch_dtype, self.np_dtype = DTYPES[dtype]
        self.hidden = 0
        self.index: dict[str, tuple[int, int]] = {}  # row key -> (offset in rows of hidden, length)
        self.kind: str | None = None                 # what a block returns: "tensor" or "tuple:N"
        self.hits = self.misses = 0
        self._map: np.memmap | None = None
        self._dirty = False
        self._open()

    # --- files
    def _manifest(self) -> dict:
        return {"format": FORMAT, "upto": self.upto, "dtype": self.dtype,
                "fingerprint": trunk_fingerprint(self.blocks, self.upto)}

    def _open(self) -> None:
        manifest = self._manifest()
        path = self.dir / "manifest.json"
        if path.is_file():
            old = io.read_json(path)
            same = {k: old.get(k) for k in ("format", "upto", "dtype")} == {k: manifest[k] for k in ("format", "upto", "dtype")}
            if same and np.allclose(old.get("fingerprint", []), manifest["fingerprint"], rtol=1e-3, atol=1e-5) \
                    and len(old.get("fingerprint", [])) == len(manifest["fingerprint"]):
                self.hidden, self.kind = old.get("hidden", 0), old.get("kind")
                index = self.dir / "index.json"
                if index.is_file():
                    self.index = {k: tuple(v) for k, v in io.read_json(index).items()}
                return
            shutil.rmtree(self.dir)  # another model, block or dtype: start again
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "states.bin").touch()
        self._write_manifest()

    def _write_manifest(self) -> None:
        io.write_json(self.dir / "manifest.json", {**self._manifest(), "hidden": self.hidden, "kind": self.kind})

    def _rows(self) -> np.memmap | None:
        size = os.path.getsize(self.dir / "states.bin")
        if size == 0:
            return None
        if self._map is None or self._map.shape[0] * self._map.shape[1] * self._map.itemsize != size:
            self._map = np.memmap(self.dir / "states.bin", dtype=self.np_dtype, mode="r",
                                  shape=(size // (self.hidden * np.dtype(self.np_dtype).itemsize), self.hidden))
        return self._map

    def _append(self, rows: list[tuple[str, torch.Tensor]]) -> None:
        """Write new rows' states to the data file; ``flush`` saves the index that points to them."""
        if not rows:
            return
        start = os.path.getsize(self.dir / "states.bin") // (self.hidden * np.dtype(self.np_dtype).itemsize)
        with open(self.dir / "states.bin", "ab") as f:
            for key, states in rows:
                if key in self.index:
                    continue
                data = states.detach().to("cpu", self.torch_dtype).contiguous().numpy()
                f.write(data.tobytes())
                self.index[key] = (start, data.shape[0])
                start += data.shape[0]
        self._dirty = True

    def flush(self) -> None:
        """Save the index (atomically), after the data it points to is on disk.  Rows appended
        since the last flush are simply computed again after a crash."""
        if not self._dirty:
            return
        with open(self.dir / "states.bin", "ab") as f:
            os.fsync(f.fileno())
        io.write_text(self.dir / "index.json", json.dumps(self.index))
        self._dirty = False

    # --- use
    def __len__(self) -> int:
        return len(self.index)

    @contextmanager
    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Iterator[None]:
        """Run the forward inside on stored states, after storing the rows that are missing."""
        if self.upto <= 0:
            yield
            return
        lengths = attention_mask.sum(1).tolist()
        keys = [row_key(input_ids[i, :n]) for i, n in enumerate(lengths)]
        missing = [i for i, k in enumerate(keys) if k not in self.index]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            self._fill(input_ids, attention_mask, missing, keys, lengths)
        if self.kind is None:  # blocks whose output cannot be stored: they run every time
            yield
            return
        rec = Recording()
        rec.output = self._assemble(keys, input_ids.shape[1], attention_mask.device)
        with replay(self.blocks, self.upto, rec):
            yield

    @torch.no_grad()
    def _fill(self, input_ids, attention_mask, rows: list[int], keys: list[str], lengths: list[int]) -> None:
        """Run the missing rows through the frozen blocks only, and store their states."""
        width = max(lengths[i] for i in rows)
        index = torch.tensor(rows, device=input_ids.device)
        ids, mask = input_ids[index, :width], attention_mask[index, :width]

        def stop(module, inputs, output):
            raise _Stop

        with record(self.blocks, self.upto) as rec:
            handle = self.blocks[self.upto - 1].register_forward_hook(stop)
            try:
                self.model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Stop:
                pass
            finally:
                handle.remove()
        self._store(rec.output, [keys[i] for i in rows], [lengths[i] for i in rows])

    def _store(self, output, keys: list[str], lengths: list[int]) -> None:
        if isinstance(output, torch.Tensor):
            kind, hidden = "tensor", output
        elif isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            kind, hidden = f"tuple:{len(output)}", output[0]
        else:  # a block returning something else: nothing to store, every step runs the trunk
            return
        if self.kind is None:
            self.kind, self.hidden = kind, hidden.shape[-1]
            self._write_manifest()
        self._append([(k, hidden[i, :n]) for i, (k, n) in enumerate(zip(keys, lengths)) if k not in self.index])

    def _assemble(self, keys: list[str], width: int, device: torch.device):
        rows = self._rows()
        dtype = next(self.blocks[self.upto].parameters()).dtype if self.upto < len(self.blocks) else torch.float32
        out = torch.zeros(len(keys), width, self.hidden, dtype=dtype)
        for i, key in enumerate(keys):
            offset, length = self.index[key]
            out[i, :length] = torch.from_numpy(np.array(rows[offset:offset + length])).to(dtype)
        out = out.to(device)
        if self.kind == "tensor":
            return out
        return (out,) + (None,) * (int(self.kind.split(":")[1]) - 1)
