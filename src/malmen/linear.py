"""Editable linear layers: their key/value sizes and the orientation of their weights.

A shift ``S`` (a x b) maps keys (inputs, size a) to value changes (outputs, size b): after an
edit the layer outputs ``v + S^T k``.  ``nn.Linear`` stores ``W`` as (b x a), GPT-2's ``Conv1D``
as (a x b).  Everything orientation-specific lives here.
"""
from __future__ import annotations

import torch
from torch import nn

try:  # GPT-2 style layers; optional so that the rest works without this transformers internal
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]


def is_editable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def dims(module: nn.Module) -> tuple[int, int]:
    """(a, b): key size and value size of a linear layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    a, b = module.weight.shape
    return a, b


def as_weight(module: nn.Module, shift: torch.Tensor) -> torch.Tensor:
    """The shift ``S`` (a x b) in the orientation of ``module.weight``."""
    return shift.t() if isinstance(module, nn.Linear) else shift


def add_shift(module: nn.Module, shift: torch.Tensor) -> None:
    """weight += S in the weight's orientation, computed in fp32, stored in the weight's dtype."""
    weight = module.weight
    new = weight.detach().float() + as_weight(module, shift.to(weight.device, torch.float32))
    weight.data.copy_(new.to(weight.dtype))
