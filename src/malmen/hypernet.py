"""The MALMEN hyper-network (paper section 4; DESIGN.md section 4).

One network per distinct edited-weight shape (a, b); modules of the same shape share it and are
told apart by their index, which selects a per-module scale and shift in every block.  Input is
``[k; g]`` (key and value-gradient of one answer token), normalised by running statistics that
are updated only during meta-training; output is the pseudo key and pseudo value-gradient.
Each module also owns a learned step ``eta`` and regulariser ``lambda``, both stored as logs, and
the exponent ``alpha`` of the regulariser's dependence on the number of keys N of a solve:
lambda(N) = lambda (N / N0)^alpha, N0 = ``HyperConfig.lambda_tokens_ref`` (alpha = 0: the paper's
one lambda for every N, and every editor saved before alpha existed).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

from .formats import EDITOR_FILE
from .precision import matmul


@dataclass
class HyperConfig:
    """Size and initial scalars of the hyper-network; saved in editor.json."""

    rank: int = 256           # low rank r of every block (paper: 1920 for GPT-J)
    n_blocks: int = 2
    eta_init: float = 1e-3    # initial step; training re-initialises it by a line search
    log_lambda_init: float = 0.0
    lambda_tokens_ref: float = 1024.0   # N0 of lambda(N) = lambda (N / N0)^alpha: where lambda is lambda

    def to_dict(self) -> dict:
        return asdict(self)


class Normaliser(nn.Module):
    """Running mean and variance of the input, merged batch by batch (Chan et al.)."""

    def __init__(self, size: int):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("var", torch.ones(size))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:
            return
        self.merge(x.shape[0], x.mean(0), x.var(0, unbiased=False))

    @torch.no_grad()
    def merge(self, n: float | torch.Tensor, batch_mean: torch.Tensor, batch_var: torch.Tensor) -> None:
        """Merge the moments of a batch of ``n`` rows (gathered from several chunks or processes).
        ``n`` may be a tensor on the device: nothing here waits for it (n = 0 changes nothing)."""
        n = torch.as_tensor(n, dtype=torch.float64, device=self.count.device)
        batch_mean, batch_var = batch_mean.float(), batch_var.float()
        total = self.count + n
        w = (n / total.clamp_min(1)).float()             # the batch's share of the rows
        c = (self.count / total.clamp_min(1)).float()    # the earlier rows' share
        delta = batch_mean - self.mean
        var = self.var * c + batch_var * w + delta.pow(2) * w * c
        empty = n == 0
        self.mean.copy_(torch.where(empty, self.mean, self.mean + delta * w))
        self.var.copy_(torch.where(empty, self.var, var))
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std = self.var.sqrt()
        # constant inputs (std 0) pass through centred instead of blowing up
        std = torch.where(std > 1e-12 * std.max().clamp_min(1e-30), std, torch.ones_like(std))
        return (x - self.mean) / std


class Block(nn.Module):
    """x = relu(y U V + c) * scale_m + shift_m + y; the identity at init (V = 0).

    The ReLU is written as clamp(min=0), whose gradient at exactly 0 is 1: at init every
    pre-activation is 0, and torch.relu's zero gradient there would leave U, V, c and scale
    without any gradient forever.
    """

    FACTORS = ("U", "V")  # the low-rank factors: nearly all of the parameters

    def __init__(self, size: int, rank: int, n_modules: int):
        super().__init__()
        self.U = nn.Parameter(torch.randn(size, rank) / math.sqrt(size))
        self.V = nn.Parameter(torch.zeros(rank, size))
        self.c = nn.Parameter(torch.zeros(size))
        self.scale = nn.Parameter(torch.ones(n_modules, size))
        self.shift = nn.Parameter(torch.zeros(n_modules, size))

    def forward(self, y: torch.Tensor, index: int, precision: str = "fp32") -> torch.Tensor:
        low = matmul(matmul(y, self.U, precision), self.V, precision)
        return (low + self.c).clamp(min=0) * self.scale[index] + self.shift[index] + y


class ShapeNet(nn.Module):
    """The network shared by all edited modules of one weight shape (a, b)."""

    def __init__(self, a: int, b: int, n_modules: int, config: HyperConfig):
        super().__init__()
        self.a, self.b = a, b
        self.normaliser = Normaliser(a + b)
        self.blocks = nn.ModuleList(Block(a + b, min(config.rank, a + b), n_modules) for _ in range(config.n_blocks))

    def forward(self, keys: torch.Tensor, grads: torch.Tensor, index: int,
                precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
        y = self.normaliser(torch.cat([keys.float(), grads.float()], -1))
        for block in self.blocks:
            y = block(y, index, precision)
        return y[..., : self.a], y[..., self.a :]


class HyperNetwork(nn.Module):
    """All shape networks plus per-module log-step and log-lambda.

    ``shapes[name] = (a, b)`` fixes, in order, the edited modules this network serves.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], config: HyperConfig | None = None):
        super().__init__()
        self.config = config or HyperConfig()
        self.module_names: list[str] = list(shapes)
        self.shapes = dict(shapes)
        self.index: dict[str, tuple[str, int]] = {}
        counts: dict[str, int] = {}
        for name, (a, b) in shapes.items():
            key = f"{a}x{b}"
            self.index[name] = (key, counts.get(key, 0))
            counts[key] = counts.get(key, 0) + 1
        self.nets = nn.ModuleDict({key: ShapeNet(*map(int, key.split("x")), n, self.config) for key, n in counts.items()})
        n = len(self.module_names)
        self.log_eta = nn.Parameter(torch.full((n,), math.log(self.config.eta_init)))
        self.log_lambda = nn.Parameter(torch.full((n,), self.config.log_lambda_init))
        self.lambda_exponent = nn.Parameter(torch.zeros(n))   # alpha; zero: lambda does not depend on N

    def position(self, name: str) -> int:
        return self.module_names.index(name)

    def eta(self, name: str) -> torch.Tensor:
        return self.log_eta[self.position(name)].exp()

    def lam(self, name: str, tokens: torch.Tensor | float | None = None) -> torch.Tensor:
        """Module ``name``'s regulariser for a solve over ``tokens`` keys (None: at N0, lambda itself)."""
        ref = self.config.lambda_tokens_ref
        return regulariser_at(self.log_lambda[self.position(name)], self.exponent(name), ref if tokens is None else tokens, ref)

    def exponent(self, name: str) -> torch.Tensor:
        """Module ``name``'s alpha in lambda(N) = lambda (N / N0)^alpha."""
        return self.lambda_exponent[self.position(name)]

    def normaliser(self, name: str) -> Normaliser:
        return self.nets[self.index[name][0]].normaliser

    def forward(self, name: str, keys: torch.Tensor, grads: torch.Tensor,
                precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo keys and pseudo value-gradients for the answer tokens of module ``name``; the
        low-rank products in ``precision`` (precision.py: 'fp32', 'tf32' or 'bf16')."""
        key, index = self.index[name]
        return self.nets[key](keys, grads, index, precision)

    def scalar_parameters(self) -> list[nn.Parameter]:
        return [self.log_eta, self.log_lambda, self.lambda_exponent]  # appended last: earlier Adam states still line up

    def network_parameters(self) -> list[nn.Parameter]:
        return list(self.nets.parameters())

    @torch.no_grad()
    def transplant(self, shapes: dict[str, tuple[int, int]], source: dict[str, str],
                   eta_factor: float = 1.0) -> "HyperNetwork":
        """A network for other modules that starts where this one is.

        Module ``m`` of ``shapes`` takes the per-module scale, shift, step and lambda of this
        network's module ``source[m]`` (same shape); the shared shape networks and normalisers are
        copied.  ``eta_factor`` scales every step, e.g. to share one edit among more layers.  Used to
        widen a trained editor to more layers without starting meta-training over.
        """
        for name, (a, b) in shapes.items():
            origin = source.get(name)
            if origin not in self.shapes:
                raise ValueError(f"module {name}: source {origin!r} is not one of this editor's modules")
            if tuple(self.shapes[origin]) != (a, b):
                raise ValueError(f"module {name} has shape {(a, b)}, its source {origin} {self.shapes[origin]}")
        new = HyperNetwork(shapes, self.config)
        for key, net in new.nets.items():
            shared = {k: v for k, v in self.nets[key].state_dict().items() if not k.endswith((".scale", ".shift"))}
            net.load_state_dict(shared, strict=False)  # per-module rows of scale and shift: below
        for name in new.module_names:
            key, i = new.index[name]
            _, j = self.index[source[name]]
            for block, old in zip(new.nets[key].blocks, self.nets[key].blocks):
                block.scale[i] = old.scale[j]
                block.shift[i] = old.shift[j]
            p, q = new.position(name), self.position(source[name])
            new.log_eta[p] = self.log_eta[q] + math.log(eta_factor)
            new.log_lambda[p] = self.log_lambda[q]
            new.lambda_exponent[p] = self.lambda_exponent[q]
        return new

    @classmethod
    def from_file(cls, path, shapes: dict[str, tuple[int, int]], config: HyperConfig) -> "HyperNetwork":
        """The network of ``shapes`` and ``config`` with the parameters saved in ``path`` (``load_file``)."""
        return cls(shapes, config).load_file(path)

    def load_file(self, path, what: str = EDITOR_FILE) -> "HyperNetwork":
        """Load the parameters saved in ``path`` (safetensors) into this network, in place; factors
        stored in another dtype are cast back.  ValueError naming ``path`` if the file does not
        match this network's modules, shapes and rank (``what`` says what it was built from)."""
        from . import io

        state = io.load_tensors(path)
        # editors saved before lambda's exponent existed: alpha = 0 is the lambda they were trained with
        state.setdefault("lambda_exponent", torch.zeros_like(self.lambda_exponent))
        try:
            self.load_state_dict(state)  # checks every key and shape
        except RuntimeError as err:  # torch lists every mismatch on its own line: the first says enough
            found = [line.strip() for line in str(err).splitlines()[1:] if line.strip()] or [str(err)]
            more = f"; {len(found) - 1} more" if len(found) > 1 else ""
            raise ValueError(f"{path}: does not match {what} ({found[0]}{more})") from None
        return self

    def stored_state(self, factor_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The state dict to save, the blocks' low-rank factors in ``factor_dtype`` (None: as they are).

        The factors are nearly all of an editor's bytes, so float16 halves its file; loading casts
        them back to the parameters' dtype. The rest keeps its dtype: the normalisers' statistics
        and the per-module scalars are few, and the step and regulariser are exponentials of logs,
        where a rounding error becomes a relative one."""
        state = self.state_dict()
        if factor_dtype is None:
            return state
        factors = {f"{prefix}.{name}" for prefix, module in self.named_modules() if isinstance(module, Block)
                   for name in Block.FACTORS}
        return {k: v.to(factor_dtype) if k in factors else v for k, v in state.items()}

    @torch.no_grad()
    def widened(self, rank: int) -> "HyperNetwork":
        """The same function with blocks of a higher ``rank``, to continue meta-training.

        Each block's U gains fresh columns (initialised as a new block's) and V as many zero rows,
        so y U V, and with it every output, is unchanged; the new rows of V get gradients at once
        and the new columns of U once those rows move, as in a new block (V = 0 at init)."""
        config = HyperConfig(**{**self.config.to_dict(), "rank": rank})
        new = HyperNetwork(self.shapes, config)
        for key, net in new.nets.items():
            old = self.nets[key]
            net.normaliser.load_state_dict(old.normaliser.state_dict())
            for block, was in zip(net.blocks, old.blocks):
                r = was.U.shape[1]
                if block.U.shape[1] < r:
                    raise ValueError(f"rank {rank} is below this network's {r}: it can only be widened")
                block.U[:, :r] = was.U
                block.V.zero_()
                block.V[:r] = was.V
                for name in ("c", "scale", "shift"):
                    getattr(block, name).copy_(getattr(was, name))
        new.log_eta.copy_(self.log_eta)
        new.log_lambda.copy_(self.log_lambda)
        new.lambda_exponent.copy_(self.lambda_exponent)
        return new


def regulariser_at(log_lambda: torch.Tensor | float, exponent: torch.Tensor | float,
                   tokens: torch.Tensor | float, ref: float) -> torch.Tensor:
    """lambda (N / N0)^alpha for a solve over N = ``tokens`` keys, from log lambda and alpha.

    With a fixed lambda the regulariser's weight against the keys' own K^T K already falls as 1 / N;
    alpha lets meta-training (or a user) say how it should fall instead.  Exactly lambda at alpha = 0."""
    log_lambda = torch.as_tensor(log_lambda)
    tokens = torch.as_tensor(tokens).reshape(()).to(log_lambda.device, torch.float64)
    scale = torch.log(tokens.clamp_min(1.0) / ref).to(log_lambda.dtype)  # N = 0 (nothing to solve): as N = 1
    return (log_lambda + torch.as_tensor(exponent).to(log_lambda) * scale).exp()


def nearest_sources(order: Sequence[str], shapes: dict[str, tuple[int, int]],
                    old_shapes: dict[str, tuple[int, int]]) -> dict[str, str]:
    """For each new module, the old module of the same shape nearest to it in ``order``.

    ``order`` lists module names as the model declares them (``named_modules``), so "nearest"
    means the closest layer without parsing any architecture-specific name.
    """
    rank = {name: i for i, name in enumerate(order)}
    sources = {}
    for name, shape in shapes.items():
        same = [o for o, s in old_shapes.items() if tuple(s) == tuple(shape)]
        if not same:
            raise ValueError(f"module {name}: the editor has no module of shape {tuple(shape)}")
        sources[name] = min(same, key=lambda o: (abs(rank[o] - rank[name]), -rank[o]))
    return sources


def shapes_of(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(key size, value size) of each named linear module of ``model``."""
    from . import linear

    return {name: linear.dims(model.get_submodule(name)) for name in names}
