"""Tensor-list ops: torch's fused ``torch._foreach_*`` kernels, or the same op tensor by tensor.

Every list op of the engine goes through this module. By default it calls the fused kernel (a
handful of launches per step whatever the number of parameters; torch falls back to a loop itself
for lists it cannot fuse). Inside ``with foreach_enabled(False):`` the same ops run one tensor at a
time, as ``torch.optim``'s ``foreach=False`` does: fewer temporaries alive at once (an out-of-place
op makes one tensor at a time instead of the whole list), and a path for tensor types the fused
kernels do not support. :class:`~flatminima.core.FlatOptimizer` sets it for its own steps
(``foreach=False``), so nothing outside the optimizer is affected. The two paths agree to rounding.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("flatminima_foreach", default=True)


@contextlib.contextmanager
def foreach_enabled(enabled: Optional[bool]) -> Iterator[None]:
    """Use the fused kernels (True, and None: the default) or per-tensor ops (False) inside the block."""
    token = _ENABLED.set(enabled is not False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def _each(other: Any, n: int) -> Sequence[Any]:
    """``other`` per tensor: a list as it is, a scalar or a 0-dim tensor repeated."""
    return other if isinstance(other, (list, tuple)) else [other] * n


def _binary(name: str):
    fused = getattr(torch, f"_foreach_{name}")

    def op(xs: Sequence[Tensor], other: Any, **kwargs: Any) -> list[Tensor]:
        if _ENABLED.get():
            return fused(list(xs), other, **kwargs)
        return [getattr(torch, name)(x, y, **kwargs) for x, y in zip(xs, _each(other, len(xs)))]

    op.__name__ = name
    return op


def _binary_(name: str):
    fused = getattr(torch, f"_foreach_{name}_")

    def op(xs: Sequence[Tensor], other: Any, **kwargs: Any) -> None:
        if _ENABLED.get():
            fused(list(xs), other, **kwargs)
            return
        for x, y in zip(xs, _each(other, len(xs))):
            getattr(x, f"{name}_")(y, **kwargs)

    op.__name__ = f"{name}_"
    return op


def _unary(name: str):
    fused = getattr(torch, f"_foreach_{name}")

    def op(xs: Sequence[Tensor]) -> list[Tensor]:
        if _ENABLED.get():
            return fused(list(xs))
        return [getattr(torch, name)(x) for x in xs]

    op.__name__ = name
    return op


add, sub, mul, div = (_binary(n) for n in ("add", "sub", "mul", "div"))
add_, sub_, mul_, div_ = (_binary_(n) for n in ("add", "sub", "mul", "div"))
clamp_min_, clamp_max_, copy_ = (_binary_(n) for n in ("clamp_min", "clamp_max", "copy"))
abs, sign = (_unary(n) for n in ("abs", "sign"))  # noqa: A001 (the torch names)


def pow(xs: Sequence[Tensor], exponent: float) -> list[Tensor]:  # noqa: A001 (the torch name)
    if _ENABLED.get():
        return torch._foreach_pow(list(xs), exponent)
    return [torch.pow(x, exponent) for x in xs]


def lerp(xs: Sequence[Tensor], ys: Sequence[Tensor], weight: float) -> list[Tensor]:
    """``x + weight·(y − x)`` per pair (out of place)."""
    if _ENABLED.get() and xs:
        return list(torch._foreach_lerp(list(xs), list(ys), weight))
    return [torch.lerp(x, y, weight) for x, y in zip(xs, ys)]


def norm(xs: Sequence[Tensor], ord: float = 2.0, dtype: Optional[torch.dtype] = None) -> list[Tensor]:
    """``‖x‖_ord`` per tensor (0-dim tensors; in ``dtype`` when given)."""
    if _ENABLED.get():
        return list(torch._foreach_norm(list(xs), ord, dtype=dtype) if dtype is not None
                    else torch._foreach_norm(list(xs), ord))
    return [torch.linalg.vector_norm(x, ord, dtype=dtype) for x in xs]
