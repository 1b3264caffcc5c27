"""Aggregating many facts' value differences into one parameter shift per module.

MALMEN (DESIGN.md section 2.4) solves  min_S sum_j |S^T k_j - d_j|^2 + lambda |S|^2,
    S* = (K^T K + lambda I)^-1 K^T D,
from the sufficient statistics A = K^T K and B = K^T D, accumulated chunk by chunk so that memory
does not grow with the number of facts.  One Cholesky factor of A + lambda I serves the forward
solve and the backward pass (DESIGN.md section 3.4).  MEND's sum aggregation
S = -eta sum_j k~_j g~_j^T is the baseline and shares the interface.

Every aggregator offers:
    accumulate(keys, pkeys, pgrads, eta)   add a chunk of tokens (no grad needed)
    solve(lam) -> S                       the shift (a x b), fp32
    backward(G) -> dL/dlambda             given G = dL/dS; prepares per-chunk gradients
    surrogate(keys, pkeys, pgrads, eta)   a scalar whose gradient w.r.t. the hyper-network's
                                          outputs (and eta) is the true one, for that chunk
"""
from __future__ import annotations

import warnings

import torch


def value_differences(keys: torch.Tensor, pkeys: torch.Tensor, pgrads: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """d_j = -eta (k~_j . k_j) g~_j  (DESIGN.md section 2.3)."""
    return -eta * (pkeys * keys.float()).sum(-1, keepdim=True) * pgrads


def cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of an SPD matrix; on failure adds growing jitter and warns."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return factor
    scale = matrix.diagonal().abs().mean().clamp_min(1e-12)
    for exponent in range(-10, 0):
        jitter = scale * 10.0 ** exponent
        factor, info = torch.linalg.cholesky_ex(matrix + jitter * torch.eye(len(matrix), dtype=matrix.dtype, device=matrix.device))
        if int(info) == 0:
            warnings.warn(f"ill-conditioned normal equation: added {float(jitter):.3g} to the diagonal", RuntimeWarning)
            return factor
    raise FloatingPointError("normal equation is not positive definite even with jitter (NaN in keys?)")


class NormalEquation:
    """MALMEN's least-squares aggregation over streaming sufficient statistics."""

    name = "malmen"

    def __init__(self, a: int, b: int, device: torch.device | str = "cpu"):
        # fp64 accumulators: sums over millions of tokens stay exact enough; chunks are fp32.
        self.A = torch.zeros(a, a, dtype=torch.float64, device=device)
        self.B = torch.zeros(a, b, dtype=torch.float64, device=device)
        self.tokens = 0

    def accumulate(self, keys, pkeys, pgrads, eta) -> None:
        keys = keys.float()
        d = value_differences(keys, pkeys.float(), pgrads.float(), eta.float())
        self.A += (keys.t() @ keys).double()
        self.B += (keys.t() @ d).double()
        self.tokens += keys.shape[0]

    def solve(self, lam: torch.Tensor | float) -> torch.Tensor:
        lam = float(lam)
        eye = torch.eye(self.A.shape[0], dtype=self.A.dtype, device=self.A.device)
        self._factor = cholesky(self.A + lam * eye)
        self._shift = torch.cholesky_solve(self.B, self._factor)
        return self._shift.float()

    def backward(self, grad_shift: torch.Tensor) -> torch.Tensor:
        """Given G = dL/dS*, keep M = (A + lambda I)^-1 G and return dL/dlambda = -<M, S*>."""
        self._M = torch.cholesky_solve(grad_shift.double(), self._factor)
        self._M32 = self._M.float()
        return -(self._M * self._shift).sum().float()

    def surrogate(self, keys, pkeys, pgrads, eta) -> torch.Tensor:
        """sum_j <M^T k_j, d_j>: its gradient w.r.t. d_j is dL/dd_j = M^T k_j."""
        d = value_differences(keys, pkeys, pgrads, eta)
        return ((keys.float() @ self._M32) * d).sum()


class SumAggregation:
    """MEND's aggregation: S = -eta sum_j k~_j g~_j^T (no regulariser)."""

    name = "sum"

    def __init__(self, a: int, b: int, device: torch.device | str = "cpu"):
        self.B = torch.zeros(a, b, dtype=torch.float64, device=device)
        self.tokens = 0

    def accumulate(self, keys, pkeys, pgrads, eta) -> None:
        self.B += (pkeys.float().t() @ (-eta.float() * pgrads.float())).double()
        self.tokens += keys.shape[0]

    def solve(self, lam=None) -> torch.Tensor:
        return self.B.float()

    def backward(self, grad_shift: torch.Tensor) -> torch.Tensor:
        self._G = grad_shift.float()
        return torch.zeros(())

    def surrogate(self, keys, pkeys, pgrads, eta) -> torch.Tensor:
        return ((pkeys @ self._G) * (-eta * pgrads)).sum()


AGGREGATIONS = {cls.name: cls for cls in (NormalEquation, SumAggregation)}
