"""Plain per-tensor loop versions of the kernels in :mod:`flatminima.core.kernels` (the tests' reference).

Written for clarity, not speed: one tensor at a time, flattened concatenations for global norms.
``tests/test_functional.py`` checks that the foreach kernels agree with these in float64.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .kernels import TINY


def global_norm(tensors: Sequence[Tensor], p: float = 2.0) -> Tensor:
    return torch.linalg.vector_norm(torch.cat([t.flatten() for t in tensors]), p)


def dual_direction(x: Sequence[Tensor], p: float, per_tensor: bool = False) -> list[Tensor]:
    if per_tensor:
        return [dual_direction([t], p)[0] for t in x]
    flat = torch.cat([t.flatten() for t in x])
    if p == 2:
        d = flat / torch.linalg.vector_norm(flat).clamp_min(TINY)
    elif p == math.inf:
        d = torch.sign(flat)
    elif p == 1:
        peak = flat.abs().max()
        mask = (flat.abs() == peak) & (peak > 0)
        d = torch.sign(flat) * mask / mask.sum().clamp_min(1)
    else:
        q = p / (p - 1.0)
        d = torch.sign(flat) * flat.abs() ** (q - 1.0) / torch.linalg.vector_norm(flat, q).clamp_min(TINY) ** (q - 1.0)
    out, start = [], 0
    for t in x:
        out.append(d[start:start + t.numel()].view_as(t))
        start += t.numel()
    return out


def ascent_direction(grads: Sequence[Tensor], scale: Sequence[Optional[Tensor]], p: float, per_tensor: bool = False) -> list[Tensor]:
    tg = [g if s is None else g * s for g, s in zip(grads, scale)]
    d = dual_direction(tg, p, per_tensor)
    return [x if s is None else x * s for x, s in zip(d, scale)]


def project(a: Sequence[Tensor], scale: Sequence[Optional[Tensor]], radius: Sequence[float], p: float, per_tensor: bool = False) -> list[Tensor]:
    ones = [torch.ones((), dtype=t.dtype) if s is None else s for t, s in zip(a, scale)]
    if p == math.inf:
        return [s * torch.clamp(t / s, -r, r) for t, s, r in zip(a, ones, radius)]
    groups = [[i] for i in range(len(a))] if per_tensor else [list(range(len(a)))]
    out = list(a)
    for idx in groups:
        n = global_norm([a[i] / ones[i] for i in idx])
        for i in idx:
            out[i] = a[i] * torch.clamp(radius[i] / n.clamp_min(TINY), max=1.0)
    return out
