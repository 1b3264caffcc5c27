"""Record keys (inputs) and value-gradients (output gradients) of chosen linear layers.

    with KeyGradTrace(model, ["model.layers.29.mlp.down_proj"], batch.mask) as trace:
        loss = loss_fn(model(...))
        loss.backward()
    keys, grads = trace.keys[name], trace.grads[name]   # (n_selected_positions x a), (... x b)

The LM's parameters are frozen inside the context, whatever the caller set (their flags are
restored on exit): each traced layer's output is made a leaf that requires grad when nothing
below it does, so backprop computes no weight gradient, leaves no ``.grad`` on the model and
stops at the lowest traced layer.  Nothing method-specific lives here.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter of ``module`` for the duration; the flags the
    caller had are restored on exit.

        with frozen(model):
            model(x).sum().backward()   # no weight gradient is computed or stored
    """
    thawed = [p for p in module.parameters() if p.requires_grad]
    for p in thawed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in thawed:
            p.requires_grad_(True)


class KeyGradTrace:
    """Context manager hooking named layers; keeps inputs and output-gradients at ``mask``.

    ``mask`` is a boolean (batch x seq) tensor selecting the positions to record, or an integer
    tensor of their flat (row-major) indices; a dict giving one such mask per layer name (an
    encoder layer and a decoder layer see different sequences); or None for all positions.
    ``keep_keys=False`` skips storing keys (and ``keep_grads=False`` skips the backward hook).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], mask: torch.Tensor | dict | None,
                 keep_keys: bool = True, keep_grads: bool = True):
        self.model, self.names, self.mask = model, list(names), mask
        self.keep_keys, self.keep_grads = keep_keys, keep_grads
        self.keys: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._stack = ExitStack()
        self._indices: dict[int, torch.Tensor] = {}

    def _rows(self, name: str) -> torch.Tensor | None:
        """The flat row indices of ``mask``, found once per mask: selecting by index needs no
        synchronisation with a GPU, where a boolean mask would need one per layer and direction
        (indices given by the caller need none at all)."""
        mask = self.mask.get(name) if isinstance(self.mask, dict) else self.mask
        if mask is None or mask.dtype != torch.bool:
            return mask
        key = id(mask)
        if key not in self._indices:
            self._indices[key] = mask.reshape(-1).nonzero().squeeze(1)
        return self._indices[key]

    def _select(self, name: str, x: torch.Tensor) -> torch.Tensor:
        rows = self._rows(name)
        flat = x.reshape(-1, x.shape[-1])
        return flat if rows is None else flat.index_select(0, rows.to(flat.device))

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if self.keep_keys:
                self.keys[name] = self._select(name, inputs[0]).detach()
            if not self.keep_grads or not torch.is_grad_enabled():
                return None
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)

            def store(grad):
                self.grads[name] = self._select(name, grad).detach()

            output.register_hook(store)
            return output
        return hook

    def __enter__(self) -> "KeyGradTrace":
        self._stack.enter_context(frozen(self.model))
        for name in self.names:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.close()
