"""Functional core: the tensor-list kernels every method is built from.

Each kernel works on lists of tensors (one entry per parameter) with the list ops of
:mod:`~flatminima.core.foreach` (torch's fused ``_foreach_*`` kernels, or per tensor with
``foreach=False``), so a step launches a handful of kernels however many parameters the model has, and keeps every reduction
on the device (no ``.item()``: no host sync in the hot path). Reductions are done in float32 (or
float64 for float64 inputs) whatever the parameter dtype.

``flatminima.core.reference`` holds the same kernels written as plain per-tensor loops; the tests check
that both agree in float64.

Notation: ``g`` the gradients, ``T`` a per-element scale (a list whose entries are
``None`` for ``T = 1``, a 0-dim tensor for a per-tensor scale, or a tensor broadcastable to the
parameter), ``p`` the norm of the perturbation ball and ``q = p/(p-1)`` its dual.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import foreach as fe
from .validation import check

TensorList = list[Tensor]
ScaleList = Sequence[Optional[Tensor]]

#: Smallest norm we divide by. Zero gradients give a zero perturbation instead of NaN; any
#: non-degenerate norm is used exactly, so closed-form tests hold to rounding.
TINY = 1e-12


def reduction_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def group_by_device_and_dtype(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` per ``(device, dtype)``, in order: foreach kernels take one of each
    per call (as ``torch.optim`` groups its tensors), and a model may mix float32 and float64."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def tensor_norms(tensors: Sequence[Tensor], p: float = 2.0) -> TensorList:
    """Per-tensor ``‖t‖_p`` as 0-dim tensors in each tensor's reduction dtype (one fused launch
    per device and dtype)."""
    tensors = list(tensors)
    out: list = [None] * len(tensors)
    for idx in group_by_device_and_dtype(tensors).values():
        chunk, rdtype = [tensors[i] for i in idx], reduction_dtype(tensors[idx[0]])
        if p == math.inf:
            norms = [n.to(rdtype) for n in fe.norm(chunk, math.inf)]
        else:
            norms = fe.norm(chunk, p, dtype=rdtype)
        for i, n in zip(idx, norms):
            out[i] = n
    return out


def combine_norms(norms: Sequence[Tensor], p: float = 2.0) -> Tensor:
    """``‖(n_1, …, n_k)‖_p``: the global p-norm from per-tensor p-norms (also over devices/ranks),
    in the widest of their dtypes (float64 as soon as one tensor is float64)."""
    device, dtype = norms[0].device, functools.reduce(torch.promote_types, (n.dtype for n in norms))
    stacked = torch.stack([n.to(device, dtype) for n in norms])
    return torch.linalg.vector_norm(stacked, p)


def global_norm(tensors: Sequence[Tensor], p: float = 2.0) -> Tensor:
    """``‖concat(tensors)‖_p`` without concatenating."""
    return combine_norms(tensor_norms(tensors, p), p)


def _norms(tensors: Sequence[Tensor], p: float, per_tensor: bool) -> TensorList:
    """Norms to normalize by: one per tensor, or the global norm repeated."""
    norms = tensor_norms(tensors, p)
    if per_tensor:
        return norms
    total = combine_norms(norms, p)
    return [total] * len(tensors)


def _cast(scalars: Sequence[Tensor], like: Sequence[Tensor]) -> TensorList:
    return [s.to(t.dtype) for s, t in zip(scalars, like)]


def dual_direction(x: Sequence[Tensor], p: float, per_tensor: bool = False,
                   factor: Optional[float] = None) -> TensorList:
    """The unit-``p``-norm direction ``d`` that maximises ``dᵀx`` (times ``factor`` when given).

    ``d = sign(x)·|x|^{q−1} / ‖x‖_q^{q−1}`` with ``1/p + 1/q = 1`` (Foret et al. 2021, eq. 2):
    ``x/‖x‖₂`` for ``p = 2``, ``sign(x)`` for ``p = ∞``, and for ``p = 1`` the mass split evenly
    over the entries of largest ``|x|``. ``per_tensor`` normalizes each tensor on its own
    (SAM-LoRA's separate A/B normalization) instead of over the whole list.
    """
    x = list(x)
    if not x:
        return []
    if p == 2 and not per_tensor:
        # One 0-dim tensor for the whole list, with the factor folded in: a single fused launch
        # and a single pass over the data, no host sync.
        inv = combine_norms(tensor_norms(x, 2.0), 2.0).clamp_min(TINY).reciprocal()
        return list(fe.mul(x, inv if factor is None else inv * factor))
    if p == 2:
        d = [t / n.clamp_min(TINY).to(t.dtype) for t, n in zip(x, tensor_norms(x, 2.0))]
    elif p == math.inf:
        d = list(fe.sign(x))
    elif p == 1:
        absx = fe.abs(x)
        peaks = _norms(x, math.inf, per_tensor)
        masks = [(a == m.to(a.dtype)) & (m > 0) for a, m in zip(absx, peaks)]
        counts = [m.sum(dtype=reduction_dtype(a)) for m, a in zip(masks, x)]
        if not per_tensor:
            total = torch.stack([c.to(counts[0].device) for c in counts]).sum()
            counts = [total] * len(x)
        signs = fe.sign(x)
        d = [s * m / c.clamp_min(1).to(s.dtype) for s, m, c in zip(signs, masks, counts)]
    else:
        d = _dual_lp(x, p, per_tensor)
    if factor is not None:
        fe.mul_(d, factor)
    return d


def _dual_lp(x: TensorList, p: float, per_tensor: bool) -> TensorList:
    """``sign(x)|x|^{q−1}/‖x‖_q^{q−1}`` for ``1 < p < ∞``, finite for every ``p`` and dtype.

    The direction is invariant to a positive rescaling of ``x``, so it is computed from
    ``y = |x|/max|x| ∈ [0, 1]`` (the max over the same set the norm runs over): ``y^{q−1} ≤ 1``
    cannot overflow however large ``q = p/(p−1)`` gets as ``p → 1⁺`` (``|x|^{q−1}`` overflows or
    underflows to 0/0 from p ≈ 1.001), and ``‖y‖_q^{q−1} = S^{1/p}`` with ``S = Σ y^q = Σ y^{q−1}·y
    ∈ [1, n]`` (``(q−1)/q = 1/p``), so the denominator needs no power ``q−1`` either (raising a
    rounded norm to ``q−1 ≈ 10⁴`` would multiply its rounding error by ``10⁴``). As ``p → 1⁺``,
    ``y^{q−1}`` tends to the indicator of the peak entries and ``d`` to the ``p = 1`` maximiser.
    ``x = 0`` gives ``d = 0``.
    """
    q = p / (p - 1.0)
    peaks = _norms(x, math.inf, per_tensor)
    # A zero peak (x = 0) divides by 1 instead: y = 0, then d = 0 below.
    y = list(fe.div(fe.abs(x), _cast([m + (m == 0).to(m.dtype) for m in peaks], x)))
    d = list(fe.pow(y, q - 1.0))
    terms = fe.mul(d, y)
    sums = [t.sum(dtype=reduction_dtype(t)) for t in terms]
    del terms, y
    if not per_tensor:
        total = torch.stack([s.to(sums[0].device) for s in sums]).sum()
        sums = [total] * len(x)
    fe.mul_(d, fe.sign(x))
    return list(fe.div(d, _cast([s.clamp_min(TINY) ** (1.0 / p) for s in sums], d)))


def ascent_direction(grads: Sequence[Tensor], scale: ScaleList, p: float, per_tensor: bool = False,
                     factor: Optional[float] = None) -> TensorList:
    """``factor·T ⊙ dual(T ⊙ g)``: the maximiser of ``uᵀg`` over ``‖T⁻¹u‖_p ≤ factor``.

    With ``factor = ρ`` this is SAM's ``ρ·g/‖g‖`` for ``T = 1`` and ``ρ·T²g/‖Tg‖₂`` (ASAM,
    Layer-SAM, GA-SAM eq. 15) for ``p = 2``.
    """
    tg = _mul(grads, scale)
    direction = dual_direction(tg, p, per_tensor, factor)
    return _mul_(direction, scale)


def inverse(scale: ScaleList) -> list[Optional[Tensor]]:
    """``T⁻¹`` (``None`` stays ``None``)."""
    return [None if s is None else 1.0 / s.clamp_min(TINY) for s in scale]


def _mul(xs: Sequence[Tensor], scale: ScaleList) -> TensorList:
    """``x ⊙ T`` out of place (``T`` broadcast per tensor; ``None`` entries mean 1)."""
    if all(s is None for s in scale):
        return list(xs)
    if all(s is not None for s in scale):
        return list(fe.mul(list(xs), list(scale)))
    return [x if s is None else x * s for x, s in zip(xs, scale)]


def _mul_(xs: TensorList, scale: ScaleList) -> TensorList:
    """``x ⊙= T`` in place."""
    if all(s is not None for s in scale) and xs:
        fe.mul_(xs, list(scale))
        return xs
    for x, s in zip(xs, scale):
        if s is not None:
            x.mul_(s)
    return xs


def scale_by_group(tensors: TensorList, factors: Sequence[float | Tensor], group_index: Sequence[int]) -> TensorList:
    """In place ``t_j *= factors[group_index[j]]`` with one foreach launch per parameter group."""
    by_group: dict[int, list[int]] = {}
    for j, gi in enumerate(group_index):
        by_group.setdefault(gi, []).append(j)
    for gi, idx in by_group.items():
        fe.mul_([tensors[j] for j in idx], factors[gi])
    return tensors


def project(a: TensorList, scale: ScaleList, radius: Sequence[float | Tensor], p: float, per_tensor: bool = False,
            inv_scale: Optional[ScaleList] = None) -> TensorList:
    """In place projection onto ``{a : ‖T⁻¹a‖_p ≤ ε}`` (GA-SAM eqs. 17–18).

    L2: ``a·min(‖T⁻¹a‖₂, ε)/‖T⁻¹a‖₂``; L∞: ``T·clip(T⁻¹a, −ε, ε)``. ``radius`` is ε per tensor;
    ``inv_scale`` may pass a precomputed ``T⁻¹`` (the scale is fixed over a step's ascent).
    """
    uniform = len(set(map(float, radius))) == 1
    if p == math.inf:
        if uniform and all(s is None for s in scale):
            fe.clamp_min_(a, -float(radius[0]))
            fe.clamp_max_(a, float(radius[0]))
            return a
        for x, s, r in zip(a, scale, radius):
            if s is None:
                x.clamp_(-r, r)
            else:
                # ε·T bounds each entry; for T > 0 this is exactly T·clip(T⁻¹a, −ε, ε).
                bound = r * s
                x.copy_(torch.minimum(torch.maximum(x, -bound), bound))
        return a
    check("norm", p == 2, p, "2 or inf: the projections GA-SAM defines")
    inv = inverse(scale) if inv_scale is None else inv_scale
    scaled = _mul(a, inv)
    if not per_tensor and uniform:
        total = combine_norms(tensor_norms(scaled, 2.0), 2.0)
        fe.mul_(a, torch.clamp(float(radius[0]) / total.clamp_min(TINY), max=1.0))
        return a
    norms = _norms(scaled, 2.0, per_tensor)
    factors = [torch.clamp(r / n.clamp_min(TINY), max=1.0) for n, r in zip(norms, radius)]
    fe.mul_(a, _cast(factors, a))
    return a


def dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """``⟨x, y⟩`` over the whole lists, in the reduction dtype."""
    return torch.stack([(a * b).sum(dtype=reduction_dtype(a)) for a, b in zip(xs, ys)]).sum()


def reject(x: Sequence[Tensor], onto: Sequence[Tensor]) -> TensorList:
    """``x − (⟨x, onto⟩/‖onto‖²)·onto``: the component of ``x`` orthogonal to ``onto`` (a new list;
    ``onto = 0`` gives ``x``). GSAM's ``g⊥``, LookSAM's stored ``g_v``, GAM's vertical component."""
    coef = dot(x, onto) / (global_norm(onto) ** 2).clamp_min(TINY)
    return list(fe.sub(list(x), fe.mul(list(onto), coef)))


def is_sharded(t: Tensor) -> bool:
    """A DTensor (an FSDP2 parameter or its gradient), tested without importing torch.distributed."""
    return type(t).__name__ == "DTensor"


def _sharded(tensors: Sequence[Tensor]) -> bool:
    """DTensors (FSDP2 parameters): some foreach ops have no sharding rule, so copy one by one."""
    return bool(tensors) and is_sharded(tensors[0])


def clone(tensors: Sequence[Tensor]) -> TensorList:
    """Bit-exact copies (the pre-perturbation weights that ``restore`` copies back)."""
    with torch.no_grad():  # a copy with autograd on would carry a grad_fn per tensor
        if _sharded(tensors):
            return [t.clone() for t in tensors]
        out = [torch.empty_like(t) for t in tensors]
        if out:
            fe.copy_(out, list(tensors))
    return out


def restore_(params: Sequence[Tensor], saved: Sequence[Tensor]) -> None:
    """Copy the saved weights back: exact, unlike ``w + ε − ε``."""
    if params:
        with torch.no_grad():
            if _sharded(params):
                for p, s in zip(params, saved):
                    p.copy_(s)
            else:
                fe.copy_(list(params), list(saved))
