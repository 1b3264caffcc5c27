"""How much of the key space each token may take in the normal equation.

The solve minimises sum_j w_j |S^T k_j - d_j|^2 + lambda |S|^2.  Weights w_j = 1 are the paper's.
The same problem in the unweighted form has the pairs (sqrt(w_j) k_j, sqrt(w_j) d_j); since
d_j = -eta (k~_j . k_j) g~_j is linear in k_j, scaling the key the solve sees scales its value
difference with it, so a weighting is a factor on the keys and nothing in solver.py changes.

Past the key size the tokens' leverages share a fixed total (solver.py, ``room``): every token
the model already answers takes its share too.  'gradient' weighs a token by the squared norm of
its value-gradient against the mean squared norm of meta-training (the hyper-network's input
statistics), so tokens whose answer barely needs to move leave their room to those that do.
The weights average 1 over tokens like those of meta-training, so the learned lambda keeps its
meaning; a fact's weights depend on that fact alone, not on the facts edited with it.
"""
from __future__ import annotations

import torch

from .hypernet import Normaliser

TOKEN_WEIGHTS = ("uniform", "gradient")


def gradient_weights(grads: torch.Tensor, normaliser: Normaliser) -> torch.Tensor:
    """w_j = |g_j|^2 / E|g|^2, E over the value-gradients the normaliser has seen (the last
    ``grads.shape[-1]`` of its inputs: it normalises [k; g])."""
    b = grads.shape[-1]
    typical = (normaliser.var[-b:] + normaliser.mean[-b:].square()).sum()
    return grads.float().square().sum(-1) / typical.clamp_min(1e-30)


def weighted_keys(keys: torch.Tensor, grads: torch.Tensor, normaliser: Normaliser, how: str) -> torch.Tensor:
    """The keys the solve sees under weighting ``how`` (``TOKEN_WEIGHTS``): sqrt(w_j) k_j."""
    if how == "uniform":
        return keys
    if how == "gradient":
        return keys * gradient_weights(grads, normaliser).sqrt().unsqueeze(-1).to(keys.dtype)
    raise ValueError(f"token weights must be one of {', '.join(TOKEN_WEIGHTS)}, not {how!r}")
