"""Matrix products on a GPU's tensor cores: where they lose nothing, and where the user accepts a loss.

An fp32 product on a Hopper GPU runs on CUDA cores at a small fraction of the tensor cores' pace.
TF32 tensor cores read each fp32 operand with 11 significant bits (8 exponent bits, as fp32) and
add in fp32.  A bf16 or fp16 number has at most 11 significant bits and a range TF32 covers, so
for operands that came out of a half-precision model (keys, value-gradients) a TF32 product is
exact in every term, and only the fp32 accumulation rounds, as in the plain fp32 product:
``exact_product`` takes that for free.  The hyper-network's products take fp32 operands, so TF32
or bf16 there rounds them: ``matmul`` offers 'fp32', 'tf32' (the default on CUDA; about 1e-3
relative) and 'bf16' (about 1e-2), measured against fp32 in docs/BENCHMARKS.md and tested in
test_precision.py.  None of this changes anything on a CPU but the 'bf16' choice.

    with tf32():
        y = x @ w                       # on tensor cores (CUDA), unchanged elsewhere
    p = exact_product(keys.t(), keys)   # fp32 K^T K, exact terms when keys are bf16
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

HALF = (torch.bfloat16, torch.float16)
PRECISIONS = ("fp32", "tf32", "bf16")
_MATMUL = torch.backends.cuda.matmul


@contextmanager
def tf32(enabled: bool = True) -> Iterator[None]:
    """fp32 matrix products on TF32 tensor cores (CUDA) inside; the previous setting after."""
    if hasattr(_MATMUL, "fp32_precision"):  # torch >= 2.9 (the older flag is deprecated there)
        before = _MATMUL.fp32_precision
        _MATMUL.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            _MATMUL.fp32_precision = before
    else:
        before = _MATMUL.allow_tf32
        _MATMUL.allow_tf32 = enabled
        try:
            yield
        finally:
            _MATMUL.allow_tf32 = before


def exact_product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y`` in fp32; on TF32 tensor cores when both are half precision (exact terms, see above)."""
    with tf32(x.dtype in HALF and y.dtype in HALF):
        return x.float() @ y.float()


class _TF32Product(torch.autograd.Function):
    """x @ w with its backward products on TF32 tensor cores too (the setting is read when a
    kernel launches, and a backward runs long after the forward's ``with`` has ended)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        with tf32():
            return x @ w

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        with tf32():
            gx = grad @ w.t() if ctx.needs_input_grad[0] else None
            gw = x.reshape(-1, x.shape[-1]).t() @ grad.reshape(-1, grad.shape[-1]) if ctx.needs_input_grad[1] else None
        return gx, gw


def matmul(x: torch.Tensor, w: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """``x @ w`` (fp32 in and out) computed in ``precision``: 'fp32', 'tf32' (CUDA tensor cores;
    fp32 elsewhere) or 'bf16' (operands rounded to bf16, fp32 result; differentiable)."""
    if precision == "fp32":
        return x @ w
    if precision == "tf32":
        return _TF32Product.apply(x, w) if x.is_cuda else x @ w
    if precision == "bf16":
        return (x.bfloat16() @ w.bfloat16()).float()
    raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
