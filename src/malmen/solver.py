"""Aggregating many facts' value differences into one parameter shift per module.

MALMEN (DESIGN.md section 2.4) solves, for each edited module,
    min_S sum_j |S^T k_j - d_j|^2 + lambda |S|^2,      S* = (K^T K + lambda I)^-1 K^T D,
from the sufficient statistics A = K^T K and B = K^T D, accumulated chunk by chunk so that memory
does not grow with the number of facts; while there are fewer tokens than half the key
dimensions, from the tokens themselves in the cheaper dual form S* = K^T (K K^T + lambda I)^-1 D.
One Cholesky factor serves the forward solve and the backward pass (DESIGN.md section 3.4).
MEND's sum aggregation S = -eta sum_j k~_j g~_j^T is the baseline.  The joint solve treats the edited modules that
write into the same space (the MLP outputs of several blocks, which all add to the residual
stream) as one linear map of the concatenated keys: sum_l S_l^T k_jl ~ sum_l d_jl, with the key
dimensions of all of them (six 1,536-dimensional layers: 9,216) to place the facts in.

Each aggregation is used the same way, over all edited modules at once; every step returns its
result instead of keeping it, so nothing carries over from one call to the next:

    agg = AGGREGATIONS[name](shapes, device)   # empty sums (``placement=``: a device per module;
                                               # ``priors=``: a regulariser shape P per module, lambda P,
                                               # as a ``Shape`` made once or a matrix)
    agg.accumulate(chunk)                      # chunk: {module: Tokens}, the same tokens in each
    agg.statistics() / agg.add_statistics(s)   # the sums by name: save them, add another's
    solution = agg.solve(lams)                 # solution.shifts: {module: S (a x b), fp32}
    agg.fit(solution)                          # {module: R^2}: how much of D the shifts realise
    agg.room(solution)                         # {module: mean leverage}: a token's share of its own ask
    adjoint = solution.backward(G)             # G = dL/dS per module; adjoint.dlam: dL/dlambda
    adjoint.surrogate(chunk).backward()        # the true gradient w.r.t. the hyper-network's outputs
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping

import torch

from .precision import exact_product


@dataclass
class Tokens:
    """A chunk of one module's tokens: keys k, the hyper-network's pseudo keys and pseudo
    value-gradients, and the module's step eta; or keys with their value differences already
    computed (``d``: a patch's tokens, patches.py)."""

    keys: torch.Tensor
    pkeys: torch.Tensor | None = None
    pgrads: torch.Tensor | None = None
    eta: torch.Tensor | None = None
    d: torch.Tensor | None = None

    def differences(self) -> torch.Tensor:
        if self.d is not None:
            return self.d.float()
        return value_differences(self.keys, self.pkeys, self.pgrads, self.eta)


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


def add_regulariser(matrix: torch.Tensor, lam: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
    """matrix += lambda P in place (P None: the paper's identity, on the diagonal alone); a view
    (one module's block of a joint system) is changed where it lies."""
    if prior is None:
        matrix.diagonal().add_(lam)
    else:
        matrix.add_(lam * prior)
    return matrix


def explained(residual: torch.Tensor, dd: torch.Tensor) -> float | None:
    """R^2 = 1 - |K S - D|^2 / |D|^2: the share of the requested value differences that a shift
    realises at the keys (1: every token's d_j is written exactly; None: nothing was asked)."""
    total = float(dd)
    return None if total <= 0.0 else 1.0 - float(residual) / total


def solved_trace(factor: torch.Tensor, prior: torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:
    """tr(M^-1 P) for M = L L^T given its Cholesky factor L (P None: the identity), a block of
    columns at a time, so that no second square matrix is held (a 16,384-wide layer's fp64 inverse
    would be another 2 GiB); for the identity, triangular solves over the nonzero rows only (about
    a^3 / 3 operations, a sixth of two full solves)."""
    size, total = len(factor), factor.new_zeros(())
    for start in range(0, size, block):
        stop = min(start + block, size)
        if prior is None:  # tr(M^-1) = |L^-1|_F^2, and L^-1 is lower triangular: rows from ``start`` on
            eye = torch.eye(size - start, stop - start, dtype=factor.dtype, device=factor.device)
            part = torch.linalg.solve_triangular(factor[start:, start:], eye, upper=False)
            total = total + part.square().sum()
        else:
            columns = prior[:, start:stop].to(factor)
            total = total + torch.cholesky_solve(columns, factor)[start:stop].diagonal().sum()
    return total


def whitened(keys: torch.Tensor, white: torch.Tensor | None) -> torch.Tensor:
    """K L^-T: keys in which lambda |S|_P^2 (P = L L^T) is the identity's lambda |S'|^2, S' = L^T S
    (``white`` None: the identity, the keys as they are)."""
    return keys if white is None else torch.linalg.solve_triangular(white, keys.t(), upper=False).t()


def unwhitened(matrix: torch.Tensor, white: torch.Tensor | None) -> torch.Tensor:
    """L^-T X: a shift (or an adjoint) in whitened coordinates back in the keys' own."""
    return matrix if white is None else torch.linalg.solve_triangular(white.t(), matrix, upper=True)


@dataclass(frozen=True)
class Shape:
    """A regulariser's shape P (SPD, a x a) with its Cholesky factor L (P = L L^T), fp64 on one
    device.  Made once (``of``) and handed to every solve that uses it, so that neither the fp64
    copy nor the factor the dual form whitens with is made again for each edit."""

    matrix: torch.Tensor
    factor: torch.Tensor

    @classmethod
    def of(cls, prior: "Shape | torch.Tensor", device: torch.device | str) -> "Shape":
        """``prior`` as a shape on ``device``: itself when it already is one there, its matrix and
        factor moved when it is one elsewhere (a copy, not a new factorisation)."""
        if isinstance(prior, Shape):
            matrix = prior.matrix.to(device)
            if matrix is prior.matrix:  # .to hands back the tensor itself when it is already there
                return prior
            return cls(matrix, prior.factor.to(device))
        matrix = prior.to(device, torch.float64)
        return cls(matrix, cholesky(matrix))


def weighted(shift: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
    """P S, the shift as the regulariser weighs it: dL/dlambda = -<M, P S>."""
    return shift if prior is None else prior @ shift


# ---------------------------------------------------------------- one module at a time

class NormalEquation:
    """MALMEN's least-squares aggregation for one module, in whichever of two equal forms is cheaper.

    While it has seen no more tokens than half the key size a, it keeps the tokens (K, D) and solves
    the dual (kernel) form S* = K^T (K K^T + lambda I)^-1 D in fp64: a system of the tokens' size,
    not a x a (an edit of a thousand facts in a 16,384-wide GPT-J layer: some 2,500 unknowns per
    column, not 16,384).  Past a / 2 tokens, where the fp64 dual would cost about what the sums
    do, it folds them into the fp64 sums A = K^T K and B = K^T D and goes on streaming, so memory
    never grows beyond the sums.  Both forms give the same S* and the same backward
    (test_solver.py).  ``statistics`` always answers with the sums (folding first).

    ``prior``: the regulariser's shape P in lambda |S|_P^2 = lambda tr(S^T P S), an SPD a x a
    matrix; None is the paper's identity.  With P = E[k k^T] over ordinary text (scaled to mean
    eigenvalue 1, keystats.py) the solve spends its freedom where unrelated inputs' keys seldom
    point: (K^T K + lambda P) S* = K^T D, MEMIT's weighting inside MALMEN's solve.  With P = L L^T
    this is the paper's equation in whitened keys K L^-T, with S* = L^-T S'*, so the dual form
    serves a shaped regulariser too (``whitened``), with the factor P's ``Shape`` carries."""

    def __init__(self, a: int, b: int, device: torch.device | str = "cpu", prior: Shape | torch.Tensor | None = None):
        self.a, self.b, self.device = a, b, device
        shape = None if prior is None else Shape.of(prior, device)
        self.prior = None if shape is None else shape.matrix  # P, fp64
        self.white = None if shape is None else shape.factor  # L, P = L L^T (the dual form's whitening)
        self.keys: list[torch.Tensor] = []    # dual form: the tokens' keys, as traced ...
        self.diffs: list[torch.Tensor] = []   # ... and their value differences, fp32
        self.A: torch.Tensor | None = None    # primal form: fp64 sums (None while dual)
        self.B: torch.Tensor | None = None
        self.dd = torch.zeros(1, dtype=torch.float64, device=device)  # |D|^2 and the token count N,
        self.n = torch.zeros(1, dtype=torch.float64, device=device)   # summed like A and B (fit, room)
        self.tokens = 0

    def accumulate(self, t: Tokens) -> None:
        # the hyper-network may run on another device than this module's (a model spread by a device map)
        keys, d = t.keys.to(self.device), t.differences().float().to(self.device)
        self.tokens += keys.shape[0]
        self.dd.add_(d.square().sum(dtype=torch.float64))  # no fp64 copy of d
        self.n.add_(keys.shape[0])
        if self.A is None and 2 * self.tokens <= self.a:
            self.keys.append(keys)
            self.diffs.append(d)
            return
        self.fold()
        self._add(keys, d)

    def _add(self, keys: torch.Tensor, d: torch.Tensor) -> None:
        # fp32 products (exact terms for half-precision keys), added into fp64 without an fp64 copy
        self.A.add_(exact_product(keys.t(), keys))
        self.B.add_(keys.float().t() @ d)

    def fold(self) -> None:
        """Turn the kept tokens into the sums (the primal form); nothing to do once there."""
        if self.A is not None:
            return
        self.A = torch.zeros(self.a, self.a, dtype=torch.float64, device=self.device)
        self.B = torch.zeros(self.a, self.b, dtype=torch.float64, device=self.device)
        if self.keys:
            self._add(torch.cat(self.keys), torch.cat(self.diffs))
        self.keys, self.diffs = [], []

    def statistics(self) -> dict[str, torch.Tensor]:
        self.fold()
        return {"A": self.A, "B": self.B, "dd": self.dd, "n": self.n}

    def count(self) -> torch.Tensor:
        """N, the keys this solve has seen (all processes' once the statistics are added)."""
        return self.n

    def sums_nbytes(self) -> int:
        """Memory of the fp64 sums (the primal form: the most this aggregation ever holds)."""
        return 8 * self.a * (self.a + self.b)

    def solve(self, lam: torch.Tensor | float) -> "NormalSolution | DualSolution":
        if self.A is None and self.keys:
            K, D = torch.cat(self.keys), torch.cat(self.diffs)
            white = self.white
            Kw = whitened(K.double(), white)  # fp64 throughout: X may be large where K K^T is nearly singular
            lam = torch.as_tensor(lam, dtype=torch.float64, device=K.device)
            gram = Kw @ Kw.t()
            gram.diagonal().add_(lam)
            factor = cholesky(gram)
            inner = Kw.t() @ torch.cholesky_solve(D.double(), factor)  # S'* = K'^T (K' K'^T + lambda I)^-1 D
            # the identity keeps the keys as traced (half the memory of fp64 ones until the backward)
            return DualSolution(unwhitened(inner, white), K if white is None else Kw, factor, lam, inner, white)
        self.fold()  # with no tokens at all, the sums are zero and S* = 0
        lam = torch.as_tensor(lam, dtype=torch.float64, device=self.A.device)
        matrix = add_regulariser(self.A.clone(), lam, self.prior)
        factor = cholesky(matrix)
        del matrix
        return NormalSolution(torch.cholesky_solve(self.B, factor), factor, self.prior, lam)

    def fit(self, solution: "NormalSolution | DualSolution") -> float | None:
        """R^2 of ``solution`` on the accumulated tokens (``explained``): from the tokens in the dual
        form, else from the sums without an a x a product: |K S - D|^2 = tr(S^T A S) - 2 tr(S^T B)
        + |D|^2, and A S = B - lambda P S at the solution, so |K S - D|^2 = |D|^2 - tr(S^T B)
        - lambda tr(S^T P S)."""
        S = solution.shift64
        if self.diffs:  # still the dual form: the tokens themselves
            D = torch.cat(self.diffs).double()
            return explained((torch.cat(self.keys).double() @ S - D).square().sum(), self.dd)
        self.fold()
        penalty = solution.lam * (S * weighted(S, self.prior)).sum()
        return explained(self.dd - (S * self.B).sum() - penalty, self.dd)

    def room(self, solution: "NormalSolution | DualSolution") -> float | None:
        """The tokens' mean leverage tr(H) / N, H = K (A + lambda P)^-1 K^T the map from asked to
        written differences: a token gets H_jj of what it alone asks (the rest of what it gets is
        what other tokens ask).  tr(H) <= min(N, key size), so past the key size the share falls
        as 1 / N.  From the factor the solve kept: tr(H) = a - lambda tr((A + lambda P)^-1 P), or
        N - lambda tr((K K^T + lambda I)^-1) in the dual form (one more O(a^3), or O(N^3), step)."""
        n = float(self.n)
        if n <= 0.0:
            return None
        size = len(solution.factor)  # N in the dual form, a in the primal
        prior = None if isinstance(solution, DualSolution) else self.prior
        return float(size - solution.lam * solved_trace(solution.factor, prior)) / n


@dataclass
class NormalSolution:
    shift64: torch.Tensor   # S* in fp64
    factor: torch.Tensor    # Cholesky factor of A + lambda P, kept for the backward
    prior: torch.Tensor | None = None  # P (None: the identity)
    lam: torch.Tensor | float = 0.0    # lambda, for the fit and the room

    @property
    def shift(self) -> torch.Tensor:
        return self.shift64.float()

    def backward(self, grad_shift: torch.Tensor) -> "NormalAdjoint":
        """Given G = dL/dS*: M = (A + lambda P)^-1 G and dL/dlambda = -<M, P S*>."""
        M = torch.cholesky_solve(grad_shift.double(), self.factor)
        return NormalAdjoint(M.float(), -(M * weighted(self.shift64, self.prior)).sum().float())


@dataclass
class DualSolution:
    shift64: torch.Tensor   # S* = L^-T K'^T (K' K'^T + lambda I)^-1 D, fp64 (K' = K L^-T; L = I for lambda I)
    K: torch.Tensor         # the tokens' keys: as traced for lambda I, whitened (K' = K L^-T, fp64) for lambda P
    factor: torch.Tensor    # Cholesky factor of K' K'^T + lambda I
    lam: torch.Tensor
    inner: torch.Tensor | None = None  # S'* = L^T S*, the whitened shift (None: S* itself)
    white: torch.Tensor | None = None  # L, the Cholesky factor of P (None: the identity)

    @property
    def shift(self) -> torch.Tensor:
        return self.shift64.float()

    def backward(self, grad_shift: torch.Tensor) -> "NormalAdjoint":
        """The primal backward without A: (A' + lambda I)^-1 = (I - K'^T (K' K'^T + lambda I)^-1 K') / lambda,
        so M' = (G' - K'^T (K' K'^T + lambda I)^-1 K' G') / lambda in whitened coordinates
        (G' = L^-1 G, M = L^-T M', dL/dlambda = -<M', S'*> = -<M, P S*>)."""
        G = grad_shift.double()  # fp64: M's part in the keys' span is a small difference
        if self.white is not None:
            G = torch.linalg.solve_triangular(self.white, G, upper=False)
        K, inner = self.K.double(), self.shift64 if self.inner is None else self.inner
        M = (G - K.t() @ torch.cholesky_solve(K @ G, self.factor)) / self.lam
        return NormalAdjoint(unwhitened(M, self.white).float(), -(M * inner).sum().float())


@dataclass
class NormalAdjoint:
    M: torch.Tensor
    dlam: torch.Tensor

    def surrogate(self, t: Tokens) -> torch.Tensor:
        """sum_j <M^T k_j, d_j>: its gradient w.r.t. d_j is dL/dd_j = M^T k_j."""
        return ((t.keys.float() @ self.M) * t.differences()).sum()


class SumAggregation:
    """MEND's aggregation for one module: S = -eta sum_j k~_j g~_j^T (no regulariser)."""

    def __init__(self, a: int, b: int, device: torch.device | str = "cpu", prior: Shape | torch.Tensor | None = None):
        if prior is not None:
            raise ValueError("MEND's sum aggregation has no regulariser to shape (regulariser: identity)")
        self.B = torch.zeros(a, b, dtype=torch.float64, device=device)
        self.n = torch.zeros(1, dtype=torch.float64, device=device)   # keys N, on the device: no host copy per solve

    def accumulate(self, t: Tokens) -> None:
        # the tokens come to this module's device (as in NormalEquation), not an a x b product
        pkeys, pgrads, eta = (x.float().to(self.B.device) for x in (t.pkeys, t.pgrads, t.eta))
        self.B.add_(pkeys.t() @ (-eta * pgrads))
        self.n.add_(t.keys.shape[0])

    def statistics(self) -> dict[str, torch.Tensor]:
        return {"B": self.B}

    def count(self) -> torch.Tensor:
        """This process's keys (the sum has no regulariser for N to scale)."""
        return self.n

    def sums_nbytes(self) -> int:
        return self.B.numel() * self.B.element_size()

    def solve(self, lam=None) -> "SumSolution":
        return SumSolution(self.B.float())

    def fit(self, solution: "SumSolution") -> None:
        """None: MEND's sum solves for no target, so there is no fit to report."""
        return None

    def room(self, solution: "SumSolution") -> None:
        """None: no least squares, no leverage."""
        return None


@dataclass
class SumSolution:
    shift: torch.Tensor

    def backward(self, grad_shift: torch.Tensor) -> "SumAdjoint":
        return SumAdjoint(grad_shift.float(), torch.zeros((), device=grad_shift.device))


@dataclass
class SumAdjoint:
    G: torch.Tensor
    dlam: torch.Tensor

    def surrogate(self, t: Tokens) -> torch.Tensor:
        return ((t.pkeys @ self.G) * (-t.eta * t.pgrads)).sum()


class PerModule:
    """Each module aggregated on its own (``cls``: NormalEquation or SumAggregation)."""

    def __init__(self, cls, shapes: Mapping[str, tuple[int, int]], device: torch.device | str = "cpu",
                 placement: Mapping[str, torch.device | str] | None = None,
                 priors: Mapping[str, Shape | torch.Tensor] | None = None):
        """``placement``: a device per module, where its sums and shift live (a model spread over
        devices keeps them beside the module's weight); modules it does not name use ``device``.
        ``priors``: each module's regulariser shape (NormalEquation's ``prior``)."""
        self.device = torch.device(device)
        placement = placement or {}
        shaped = {name: {"prior": p} for name, p in (priors or {}).items()}
        self.parts = {name: cls(a, b, torch.device(placement.get(name, device)), **shaped.get(name, {}))
                      for name, (a, b) in shapes.items()}

    def sums_nbytes(self) -> int:
        """Memory of the fp64 sums of every module."""
        return sum(part.sums_nbytes() for part in self.parts.values())

    def accumulate(self, chunk: Mapping[str, Tokens]) -> None:
        for name, tokens in chunk.items():
            self.parts[name].accumulate(tokens)

    def statistics(self) -> dict[str, torch.Tensor]:
        """The sums, by name (``module/A``), to save or to add to another aggregator's."""
        return {f"{name}/{key}": t for name, part in self.parts.items() for key, t in part.statistics().items()}

    def add_statistics(self, stats: Mapping[str, torch.Tensor], sign: float = 1.0) -> None:
        for key, value in stats.items():
            name, _, which = key.rpartition("/")
            target = self.parts[name].statistics()[which]  # the live sums (a normal equation folds first)
            target.add_(value.to(target), alpha=sign)

    def counts(self) -> dict[str, torch.Tensor]:
        """Each module's number of keys N (for a regulariser that depends on it, hypernet.py)."""
        return {name: part.count() for name, part in self.parts.items()}

    def solve(self, lams: Mapping[str, torch.Tensor]) -> "PerModuleSolution":
        return PerModuleSolution({name: part.solve(lams[name]) for name, part in self.parts.items()})

    def fit(self, solution: "PerModuleSolution") -> dict[str, float | None]:
        """Each module's R^2 (``NormalEquation.fit``)."""
        return {name: part.fit(solution.parts[name]) for name, part in self.parts.items()}

    def room(self, solution: "PerModuleSolution") -> dict[str, float | None]:
        """Each module's mean leverage (``NormalEquation.room``)."""
        return {name: part.room(solution.parts[name]) for name, part in self.parts.items()}


@dataclass
class PerModuleSolution:
    parts: dict

    @property
    def shifts(self) -> dict[str, torch.Tensor]:
        return {name: part.shift for name, part in self.parts.items()}

    def backward(self, G: Mapping[str, torch.Tensor]) -> "PerModuleAdjoint":
        return PerModuleAdjoint({name: part.backward(G[name]) for name, part in self.parts.items()})


@dataclass
class PerModuleAdjoint:
    parts: dict

    @property
    def dlam(self) -> dict[str, torch.Tensor]:
        return {name: part.dlam for name, part in self.parts.items()}

    def surrogate(self, chunk: Mapping[str, Tokens]) -> torch.Tensor:
        return sum(self.parts[name].surrogate(tokens) for name, tokens in chunk.items())


# ---------------------------------------------------------------- all modules at once

class JointNormalEquation:
    """One normal equation over the concatenated keys of all modules (the same value size b):

        min_{S_1..S_L} sum_j |sum_l S_l^T k_jl - sum_l d_jl|^2 + sum_l lambda_l |S_l|^2.

    Stacking S = [S_1; ...; S_L] and k^_j = [k_j1; ...; k_jL], this is MALMEN's equation with
    A = sum_j k^_j k^_j^T, B = sum_j k^_j (sum_l d_jl)^T and the regulariser diag(lambda_l I).
    Every chunk must hold the same tokens for every module (the same answer positions).  The one
    system lives on ``device`` whatever the modules' ``placement``: its shifts move to each
    module's weight when they are applied."""

    def __init__(self, shapes: Mapping[str, tuple[int, int]], device: torch.device | str = "cpu",
                 placement: Mapping[str, torch.device | str] | None = None,
                 priors: Mapping[str, Shape | torch.Tensor] | None = None):
        """``priors``: each module's regulariser shape P_l (lambda_l P_l in place of lambda_l I)."""
        values = {b for _, b in shapes.values()}
        if len(values) != 1:
            raise ValueError(f"a joint solve needs modules of one output size, got {sorted(values)}")
        self.device = torch.device(device)
        self.names = list(shapes)
        self.sizes = [shapes[n][0] for n in self.names]
        total, b = sum(self.sizes), values.pop()
        self.A = torch.zeros(total, total, dtype=torch.float64, device=device)
        self.B = torch.zeros(total, b, dtype=torch.float64, device=device)
        # only P itself: the joint solve never whitens, so a matrix given needs no factor
        self.priors = {n: (p.matrix if isinstance(p, Shape) else p).to(self.device, torch.float64)
                       for n, p in (priors or {}).items()}
        self.dd = torch.zeros(1, dtype=torch.float64, device=device)  # |sum_l d_l|^2, for the fit alone
        self.n = torch.zeros(1, dtype=torch.float64, device=device)   # keys N, summed like A and B

    def sums_nbytes(self) -> int:
        """Memory of the fp64 sums."""
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()

    def stacked(self, chunk: Mapping[str, Tokens]) -> tuple[torch.Tensor, torch.Tensor]:
        """(concatenated keys, summed value differences) of a chunk."""
        counts = {t.keys.shape[0] for t in chunk.values()}
        if len(counts) != 1 or set(chunk) != set(self.names):
            raise ValueError("a joint solve needs the same tokens for every edited module")
        keys = torch.cat([chunk[n].keys for n in self.names], -1)
        return keys, sum(chunk[n].differences() for n in self.names)

    def accumulate(self, chunk: Mapping[str, Tokens]) -> None:
        keys, d = self.stacked(chunk)
        self.A.add_(exact_product(keys.t(), keys))
        self.B.add_(keys.float().t() @ d.float())
        self.dd.add_(d.square().sum(dtype=torch.float64))  # no fp64 copy of d
        self.n.add_(keys.shape[0])

    def statistics(self) -> dict[str, torch.Tensor]:
        return {"joint/A": self.A, "joint/B": self.B, "joint/dd": self.dd, "joint/n": self.n}

    def counts(self) -> dict[str, torch.Tensor]:
        """N for every module: each sees the same keys."""
        return {name: self.n for name in self.names}

    def add_statistics(self, stats: Mapping[str, torch.Tensor], sign: float = 1.0) -> None:
        for key, value in stats.items():
            target = self.statistics()[key]
            target.add_(value.to(target), alpha=sign)

    def solve(self, lams: Mapping[str, torch.Tensor]) -> "JointSolution":
        matrix, start = self.A.clone(), 0
        lams = {name: torch.as_tensor(lams[name], dtype=matrix.dtype, device=matrix.device) for name in self.names}
        for name, a in zip(self.names, self.sizes):  # lambda_l P_l on module l's diagonal block
            add_regulariser(matrix[start:start + a, start:start + a], lams[name], self.priors.get(name))
            start += a
        factor = cholesky(matrix)
        del matrix
        return JointSolution(self, torch.cholesky_solve(self.B, factor), factor, lams)

    def fit(self, solution: "JointSolution") -> dict[str, float | None]:
        """R^2 of the one joint target, sum_l d_jl (as ``NormalEquation.fit`` from the sums)."""
        shifts = solution._split(solution.shift64)
        penalty = sum(solution.lams[n] * (shifts[n] * weighted(shifts[n], self.priors.get(n))).sum() for n in self.names)
        return {"joint": explained(self.dd - (solution.shift64 * self.B).sum() - penalty, self.dd)}

    def room(self, solution: "JointSolution") -> dict[str, None]:
        """Not computed: it needs the diagonal blocks of a 9,216-square inverse (minutes on a CPU)."""
        return {"joint": None}


@dataclass
class JointSolution:
    owner: JointNormalEquation
    shift64: torch.Tensor
    factor: torch.Tensor
    lams: dict              # lambda_l, for the fit

    def _split(self, stacked: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.owner.names, stacked.split(self.owner.sizes, 0)))

    @property
    def shifts(self) -> dict[str, torch.Tensor]:
        return {name: s.float() for name, s in self._split(self.shift64).items()}

    def backward(self, G: Mapping[str, torch.Tensor]) -> "JointAdjoint":
        """M = (A + Lambda)^-1 [G_1; ...; G_L]; dL/dlambda_l = -<M_l, P_l S_l>."""
        M = torch.cholesky_solve(torch.cat([G[n].double() for n in self.owner.names]), self.factor)
        parts, shifts = self._split(M), self._split(self.shift64)
        dlam = {name: -(parts[name] * weighted(shifts[name], self.owner.priors.get(name))).sum().float()
                for name in self.owner.names}
        return JointAdjoint(self.owner, M.float(), dlam)


@dataclass
class JointAdjoint:
    owner: JointNormalEquation
    M: torch.Tensor
    dlam: dict

    def surrogate(self, chunk: Mapping[str, Tokens]) -> torch.Tensor:
        """sum_j <M^T k^_j, sum_l d_jl>: dL/dd_jl = M^T k^_j for every module l."""
        keys, d = self.owner.stacked(chunk)
        return ((keys.float() @ self.M) * d).sum()


def report(aggregator, solution) -> dict[str, dict[str, float]]:
    """What a solve tells of itself, for people: ``fit`` (R^2) and ``room`` (mean leverage) of each
    module or joint system that has them (MEND's sum has neither)."""
    out = {}
    for key, values in (("fit", aggregator.fit(solution)), ("room", aggregator.room(solution))):
        kept = {name: value for name, value in values.items() if value is not None}
        if kept:
            out[key] = kept
    return out


def _per_module(cls):
    return lambda shapes, device="cpu", placement=None, priors=None: PerModule(cls, shapes, device, placement, priors)


AGGREGATIONS = {"malmen": _per_module(NormalEquation), "sum": _per_module(SumAggregation), "joint": JointNormalEquation}
