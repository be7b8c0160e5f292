"""Scopes: which tensors a method moves, given as parameters, a module, a predicate or name patterns."""

from __future__ import annotations

import re
from typing import Callable, Iterable, Optional, Union

import torch
from torch import Tensor

from .validation import check


class SupportScope:
    """A scope that also says *where* the perturbation lives: on some of the trained tensors
    (moved in place, as any scope) and on tensors the optimizer does not hold, which it puts at
    ``w + ε`` functionally (the LoRA supports of :func:`flatminima.lora.support`). The optimizer
    asks it for its trained tensors and lets it wrap the method's perturbation."""

    def parameters(self) -> list[Tensor]:
        """The trained tensors it moves in place (possibly none)."""
        raise NotImplementedError

    def wrap(self, perturbation):
        """The method's perturbation, made to act on this support."""
        raise NotImplementedError


ScopeSpec = Union[None, Iterable[Tensor], Callable[[Tensor], bool], SupportScope]


def params_by_name(model: torch.nn.Module, include: Optional[str] = None, exclude: Optional[str] = None) -> list[Tensor]:
    """The parameters of ``model`` whose qualified names match the regex ``include`` (``re.search``;
    all when None) and not ``exclude``: a name scope, e.g. ``exclude=r"bias|norm"``."""
    patterns = {}
    for name, pattern in (("include", include), ("exclude", exclude)):
        if pattern is not None:
            try:
                patterns[name] = re.compile(pattern)
            except (re.error, TypeError) as exc:
                check(name, False, pattern, f"a regular expression: {exc}")
    chosen = [p for n, p in model.named_parameters()
              if ("include" not in patterns or patterns["include"].search(n))
              and not ("exclude" in patterns and patterns["exclude"].search(n))]
    check("include/exclude", bool(chosen), (include, exclude), "patterns that select at least one parameter")
    return chosen


def tensor_predicate(name: str, scope: ScopeSpec) -> Optional[Callable[[Tensor], bool]]:
    """A tensor set given as None (every tensor), an ``nn.Module`` (its parameters), an iterable of
    parameters or a predicate, as a predicate on tensors; anything else is refused naming ``name``."""
    if scope is None:
        return None
    if callable(scope) and not isinstance(scope, torch.nn.Module):
        return scope
    if isinstance(scope, torch.nn.Module):
        scope = list(scope.parameters())
    # A string is an iterable of characters, a tensor one of rows: neither lists parameters.
    ok = isinstance(scope, Iterable) and not isinstance(scope, (str, bytes, Tensor))
    items = list(scope) if ok else []
    check(name, ok and all(isinstance(p, Tensor) for p in items), scope if not ok else type(scope).__name__,
          "None, an nn.Module, an iterable of parameters, or a callable parameter -> bool")
    ids = {id(p) for p in items}
    return lambda p: id(p) in ids
