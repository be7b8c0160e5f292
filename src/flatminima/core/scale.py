"""Scales ``T``: the per-element size of an adversarial perturbation (the "scale" axis of a method).

An adversarial method maximises ``uᵀg`` over ``‖T⁻¹u‖_p ≤ ρ``. Every SAM variant in this library
is a choice of ``T`` made from group statistics at one granularity:

============================  =======================  ==============================================
``kind``                      ``T_i``                  used by
============================  =======================  ==============================================
``"one"``                     ``1``                    SAM, multi-step defense (Zhang et al. 2021)
``"w"``                       ``‖w_i‖ (+η)``           ASAM (Kwon et al. 2021), element- or filter-wise
``"w_over_g"``                ``‖w_i‖/‖g_i‖``          Layer-SAM (Liu et al. 2021)
``"gradient_strength"``       ``√n_i/(‖g_i‖·√n)``      GA-SAM (Zhang et al. 2022, eq. 13)
``"inv_g"``                   ``1/‖g_i‖``              GA-SAM Table 2 ablation
``"w_over_sqrt_n"``           ``‖w_i‖/√n_i``           GA-SAM Table 2 ablation
``"fisher"``                  ``(1 + η·g_i²)^(−1/2)``  Fisher-SAM (Kim et al. 2022), element-wise
============================  =======================  ==============================================

With ``T² = F⁻¹``, ``F = 1 + η·g²`` the diagonal empirical Fisher, ``ρ·T²g/‖Tg‖₂`` is Fisher-SAM's
``ρ·F⁻¹g/√(gᵀF⁻¹g)``: the maximiser over the Fisher ball ``εᵀFε ≤ ρ²``.

Groups ``i`` (``granularity``): ``"model"`` (one group), ``"layer"`` (a tensor), ``"filter"``
(an output row / output channel of a ≥2-D tensor; 1-D tensors form one group), ``"element"``.
``n_i`` is the number of elements in group ``i`` and ``n`` the number in the scope.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import foreach as fe
from .kernels import TINY, ScaleList, combine_norms, is_sharded, reduction_dtype, tensor_norms
from .validation import check, check_choice, check_nonnegative

KINDS = ("one", "w", "w_over_g", "gradient_strength", "inv_g", "w_over_sqrt_n")
#: Every kind, Fisher-SAM's included (element-wise only; ``eta`` is its damping, not an offset).
ALL_KINDS = KINDS + ("fisher",)
GRANULARITIES = ("model", "layer", "filter", "element")


def _filter_norms(t: Tensor) -> Tensor:
    """Norm of each output row, shaped to broadcast over ``t``."""
    if t.dim() < 2:
        return torch.linalg.vector_norm(t, dtype=reduction_dtype(t))
    norms = torch.linalg.vector_norm(t.flatten(1), dim=1, dtype=reduction_dtype(t))
    return norms.view(-1, *([1] * (t.dim() - 1)))


def group_norms(tensors: Sequence[Tensor], granularity: str) -> list[Tensor]:
    """``‖x_i‖₂`` of the group each element belongs to, broadcastable to each tensor."""
    if granularity == "element":
        return list(fe.abs(list(tensors)))
    if granularity == "filter":
        return [_filter_norms(t) for t in tensors]
    norms = tensor_norms(tensors, 2.0)
    if granularity == "layer":
        return norms
    total = combine_norms(norms, 2.0)
    return [total] * len(tensors)


def group_sizes(tensors: Sequence[Tensor], granularity: str) -> list[float]:
    """``n_i`` for the group of each tensor's elements."""
    if granularity == "element":
        return [1.0] * len(tensors)
    if granularity == "filter":
        return [float(t[0].numel()) if t.dim() >= 2 else float(t.numel()) for t in tensors]
    if granularity == "layer":
        return [float(t.numel()) for t in tensors]
    total = float(sum(t.numel() for t in tensors))
    return [total] * len(tensors)


class Scale:
    """``T`` of one ``kind`` at one ``granularity``, plus ``eta`` (ASAM's ``|w| + η``).

    Calling it with the scoped parameters and their gradients returns one entry per tensor:
    ``None`` for ``T = 1`` (so SAM pays nothing for it) or a tensor broadcastable to the parameter.
    ``unit`` (a predicate of a tensor) picks tensors whose ``T`` is 1 whatever the kind (the
    official ASAM code's biases); the group statistics (``n``, a model-wide norm) still count them.
    """

    def __init__(self, kind: str = "one", granularity: str = "layer", eta: float = 0.0,
                 unit: Optional[Callable[[Tensor], bool]] = None):
        check_choice("scale", kind, ALL_KINDS)
        check_choice("granularity", granularity, GRANULARITIES)
        check("granularity", kind != "fisher" or granularity == "element", granularity,
              "'element' for the Fisher scale (a diagonal Fisher)")
        check("unit", unit is None or callable(unit), type(unit).__name__, "None or a predicate of a tensor")
        self.kind, self.granularity, self.eta = kind, granularity, check_nonnegative("eta", eta)
        self.unit = unit

    @property
    def is_identity(self) -> bool:
        return self.kind == "one" and self.eta == 0.0

    def __repr__(self) -> str:
        unit = "" if self.unit is None else ", unit=<predicate>"
        return f"Scale({self.kind!r}, {self.granularity!r}, eta={self.eta}{unit})"

    def __call__(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> ScaleList:
        out = self._scales(params, grads)
        if self.unit is not None:
            out = [None if self.unit(p) else t for p, t in zip(params, out)]
        return out

    def _scales(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> ScaleList:
        if self.is_identity:
            return [None] * len(params)
        with torch.no_grad():
            if self.kind == "fisher":  # (1 + η·g²)^(−1/2), in the reduction dtype
                return [torch.rsqrt(g.to(reduction_dtype(g)).square().mul_(self.eta).add_(1.0)) for g in grads]
            if self.kind == "one":
                return [torch.full((), 1.0 + self.eta, dtype=reduction_dtype(p), device=p.device) for p in params]
            if self.granularity in ("layer", "model"):
                return self._per_tensor(params, grads)
            w = group_norms(params, self.granularity) if self.kind in ("w", "w_over_g", "w_over_sqrt_n") else None
            g = group_norms(grads, self.granularity) if self.kind in ("w_over_g", "inv_g", "gradient_strength") else None
            n_i = group_sizes(params, self.granularity)
            n = float(sum(p.numel() for p in params))
            out = [self._formula(wi, gi, ni, n) for wi, gi, ni in zip(w or [None] * len(params),
                                                                     g or [None] * len(params), n_i)]
            if self.eta:
                fe.add_(out, self.eta)
            return out

    def _per_tensor(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> ScaleList:
        """Layer- and model-wise ``T``: one value per tensor, computed as one vector (a few
        kernels, not a few per tensor)."""
        device = params[0].device

        def stacked(tensors):
            norms = torch.stack([t.to(device) for t in tensor_norms(tensors, 2.0)])
            if self.granularity == "model":
                norms = torch.linalg.vector_norm(norms).expand(len(tensors))
            return norms

        w = stacked(params) if self.kind in ("w", "w_over_g", "w_over_sqrt_n") else None
        g = stacked(grads) if self.kind in ("w_over_g", "inv_g", "gradient_strength") else None
        norms = w if w is not None else g
        sizes = torch.tensor(group_sizes(params, self.granularity), dtype=norms.dtype, device=device)
        if is_sharded(norms):  # FSDP2: the norms are replicated DTensors; so must the sizes be
            from torch.distributed.tensor import DTensor, Replicate

            sizes = DTensor.from_local(sizes.to(norms.to_local().device), norms.device_mesh, [Replicate()])
        n = float(sum(p.numel() for p in params))
        out = self._formula(w, g, sizes, n) + self.eta
        return [t if t.device == p.device else t.to(p.device) for t, p in zip(out.unbind(), params)]

    def _formula(self, w, g, n_i, n: float):
        """``T`` from group norms ``w`` (weights) and ``g`` (gradients) and group sizes ``n_i``."""
        kind = self.kind
        if kind == "w":
            return w
        if kind == "w_over_sqrt_n":
            return w / (n_i ** 0.5)
        # A group whose clean gradient is exactly zero (a LoRA A factor while B = 0, at the first
        # step) has no direction to scale: T = 0, no perturbation. T = 1/TINY instead would let a
        # later ascent step (K ≥ 2), where that gradient is no longer zero, move it by ~1e12·η.
        known = g > 0
        g = g.clamp_min(TINY)
        if kind == "w_over_g":
            t = w / g
        elif kind == "inv_g":
            t = 1.0 / g
        else:  # gradient_strength
            t = (n_i / n) ** 0.5 / g
        return t * known  # (a product, not torch.where: it also runs on FSDP2's DTensor norms)
