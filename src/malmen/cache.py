"""Where a meta-training step keeps the keys and value-gradients of its edit prompts.

They are needed twice: for the shifts, and again for the backward through the solve and the
hyper-network.  At n facts per step they take n x tokens x (a + b) numbers per edited module,
the largest memory of a step.  ``StepCache`` stores them in fp32 or bf16, never wider than
traced (the hyper-network and the solver upcast every chunk to fp32), and above a budget spills
them to memory-mapped files in a temporary directory that is removed when the step ends.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# numpy has no bf16: its bits travel as int16
_NUMPY = {torch.float32: (np.float32, torch.float32), torch.bfloat16: (np.int16, torch.int16),
          torch.float16: (np.float16, torch.float16)}


class StepCache:
    """``put`` converts and, above ``budget_mb`` (for everything put at once), spills;
    ``close`` frees the files."""

    def __init__(self, dtype: str = "fp32", budget_mb: float | None = None, directory: str | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.dtype, self.budget_mb, self.directory = DTYPES[dtype], budget_mb, directory
        self._tmp: Path | None = None
        self._files = 0
        self.spilled_mb = 0.0

    def put(self, *groups: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], ...]:
        """The same dicts of tensors (keys by module, gradients by module, ...), stored."""
        out = tuple({k: self._stored(v.detach()) for k, v in g.items()} for g in groups)
        size_mb = sum(v.numel() * v.element_size() for g in out for v in g.values()) / 2**20
        if self.budget_mb is None or size_mb <= self.budget_mb:
            return out
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="malmen-cache-", dir=self.directory))
        self.spilled_mb += size_mb
        return tuple({k: self._spill(v) for k, v in g.items()} for g in out)

    def _stored(self, value: torch.Tensor) -> torch.Tensor:
        """In the cache's dtype, never wider than traced: a half-precision model's keys stay as
        they are (fp32 would double their memory and add nothing)."""
        return value if value.element_size() < self.dtype.itemsize else value.to(self.dtype)

    def _spill(self, value: torch.Tensor) -> torch.Tensor:
        np_dtype, bits = _NUMPY[value.dtype]
        self._files += 1
        array = np.memmap(self._tmp / f"{self._files}.bin", dtype=np_dtype, mode="w+", shape=tuple(value.shape))
        array[...] = value.cpu().contiguous().view(bits).numpy()
        return torch.from_numpy(array).view(value.dtype)

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "StepCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
