"""Frozen weights at ``W0 + ε`` for one pass, without writing them, and their gradients on demand.

While a pass runs, each chosen base layer (``nn.Linear``, ``nn.Conv{1,2,3}d``, ``nn.Embedding``)
computes with the weight ``W0 + ε`` in the slot of ``W0`` for that call only: its class's own
forward (and so PyTorch's own backward) runs, ``W0`` is never written, and the weight that autograd
would keep for the backward is replaced by its recipe and rebuilt when the backward needs it, so no
second copy of the layer lives through the pass. With ``capture``, the weight is a leaf that
requires grad and its gradient ``∂L/∂W`` is summed over the pass's micro-batches into a buffer;
``W0.requires_grad`` is never changed.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn


class RebuiltWeight:
    """Saved-tensor hooks around one layer's op: the weight made by ``build(dtype)`` (or a view of
    it) that autograd would keep for the backward is saved as its geometry and built again when the
    backward unpacks it, so no weight-sized tensor lives between the forward and the backward; every
    other saved tensor passes through. The backward itself is PyTorch's own (linear, convolution,
    embedding), so biases, padding modes and autocast behave as usual. Saved tensors of this one op
    bypass saved-tensor hooks a user installs around the model."""

    def __init__(self, build: Callable[[torch.dtype], Tensor]):
        self.build = build
        self.weight: Optional[Tensor] = None

    def pack(self, t: Tensor) -> Any:
        w = self.weight
        if w is not None and (t is w or t.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()):
            return (t.dtype, t.size(), t.stride(), t.storage_offset())
        return t

    def unpack(self, packed: Any) -> Tensor:
        if isinstance(packed, tuple):
            dtype, size, stride, offset = packed
            return self.build(dtype).as_strided(size, stride, offset)
        return packed


def forward_with_weight(base: nn.Module, class_forward: Callable[..., Tensor], weight: Tensor,
                        build: Callable[[torch.dtype], Tensor], x: Tensor) -> Tensor:
    """``class_forward(base, x)`` with ``weight`` in ``base``'s weight slot for this call only (the
    parameter is put back, also when it raises); autograd keeps ``build``'s recipe, not ``weight``."""
    recipe = RebuiltWeight(build)
    recipe.weight = weight
    params = base._parameters
    saved = params["weight"]
    try:
        with torch.autograd.graph.saved_tensors_hooks(recipe.pack, recipe.unpack):
            params["weight"] = weight
            return class_forward(base, x)
    finally:
        params["weight"] = saved
        recipe.weight = None


class _Forward:
    """A base layer's forward with ``W0 + ε`` (``ε`` None: ``W0``) in the weight's slot."""

    def __init__(self, base: nn.Module, eps: Optional[Tensor], grad: Optional[list]):
        self.base, self.eps, self.grad = base, eps, grad
        self.class_forward = type(base).forward
        self.embedding = isinstance(base, nn.Embedding)

    def weight(self, dtype: torch.dtype) -> Tensor:
        w0 = self.base.weight.detach()
        if self.eps is None:
            return w0.to(dtype)
        return torch.add(w0, self.eps).to(dtype)  # in the wider of the two dtypes, then rounded once

    def _accumulate(self, g: Tensor) -> None:
        if self.grad[0] is None:  # autograd hands over a fresh tensor and never writes it again
            self.grad[0] = g.detach()
        else:
            self.grad[0].add_(g)

    def __call__(self, x: Tensor) -> Tensor:
        base, device = self.base, x.device.type
        autocast = torch.is_autocast_enabled(device) and not self.embedding
        dtype = torch.get_autocast_dtype(device) if autocast else base.weight.dtype
        w = self.weight(dtype)
        if self.grad is not None:  # a fresh leaf (an alias of W0 at most): W0.requires_grad never changes
            w = w.detach().requires_grad_(True)
            w.register_hook(self._accumulate)
        return forward_with_weight(base, self.class_forward, w, self.weight, x)


class PatchedForward:
    """``module.forward`` replaced for the duration of a pass; :meth:`undo` puts back exactly what
    was there (an instance attribute, or none)."""

    def __init__(self, module: nn.Module, forward: Callable[..., Tensor]):
        self.module, self.saved = module, module.__dict__.get("forward")
        module.forward = forward

    def undo(self) -> None:
        if self.saved is None:
            del self.module.forward
        else:
            self.module.forward = self.saved


@contextlib.contextmanager
def functional_weights(bases: Sequence[nn.Module], eps: Optional[Sequence[Optional[Tensor]]] = None,
                       capture: bool = False) -> Iterator[list[Optional[Tensor]]]:
    """Inside the block, ``bases[i]`` computes with ``W0_i + eps[i]`` (``eps`` None, or an entry
    None: ``W0_i``); yields the list of gradient buffers ``∂L/∂W_i`` filled by the backward passes
    run inside the block (``capture=True``; None where no backward reached a layer), else a list of
    None. The base layers' forwards are restored on exit, also when the block raises."""
    grads: list[Optional[Tensor]] = [None] * len(bases)
    cells = [[None] for _ in bases] if capture else None
    patches = []
    try:
        for i, base in enumerate(bases):
            e = None if eps is None else eps[i]
            if e is None and not capture:
                continue
            patches.append(PatchedForward(base, _Forward(base, e, cells[i] if capture else None)))
        yield grads
    finally:
        for patch in reversed(patches):
            patch.undo()
        if capture:
            grads[:] = [c[0] for c in cells]
