"""The method registry: names, hyperparameters and :func:`create`.

Every constructor has the shape ``Method(base_optimizer, **hyperparameters)`` and accepts the
common keyword arguments of :class:`~flatminima.core.FlatOptimizer`: ``schedule`` (strength
schedule: ``"constant"``, ``"linear"``, ``"cosine"``, ``"lr"`` or a callable of the step),
``total_steps``, ``scope`` (an iterable of parameters, a module or a predicate), ``seed``,
``sync_perturbation``, ``foreach`` (False: per-tensor ops instead of fused foreach kernels) and,
for gradient-based methods, ``ascent_weight_decay``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..core.registry import Registry
from ..core.shell import Base, FlatOptimizer
from ..core.validation import check, check_choice, check_range

METHODS: Registry[type] = Registry("method name")


def register(name: str, *aliases: str):
    """Class decorator adding a method to the registry under ``name`` (and ``aliases``); a name that
    is taken (ignoring case, ``-`` and ``_``) is refused."""

    def deco(cls):
        cls.method_name = name
        return METHODS.register(name, *aliases)(cls)

    return deco


def unregister(name: str) -> type:
    """Remove method ``name`` and its aliases from the registry (a method registered in a test or a
    notebook); returns its class."""
    return METHODS.unregister(name)


def available() -> list[str]:
    """Names accepted by :func:`create`."""
    return METHODS.names()


def get(name: str) -> type:
    """The method class registered under ``name`` (case, ``-`` and ``_`` ignored)."""
    return METHODS.get(name)


def hyperparameters(name: str) -> list[str]:
    """Keyword arguments method ``name`` accepts (its own and the common ones)."""
    cls = get(name)
    names = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "base", "common")]
    return names + [c for c in COMMON if c not in names]


def needs_model(name: str) -> bool:
    """Whether method ``name`` takes the model (Flat-LoRA, SAM-LoRA: the PEFT model whose LoRA layers
    it perturbs)."""
    return "model" in hyperparameters(name)


def create(name: str, base: torch.optim.Optimizer, **hyperparams: Any) -> FlatOptimizer:
    """``create("sam", torch.optim.SGD(...), rho=0.1)``: build a method by name."""
    cls = get(name)
    accepted = hyperparameters(name)
    for k in hyperparams:
        check(f"hyperparameter {k!r} for {name}", k in accepted, k, f"one of {', '.join(accepted)}")
    return cls(base, **hyperparams)


COMMON = ("schedule", "total_steps", "scope", "seed", "sync_perturbation", "ascent_weight_decay", "foreach")


def per_tensor(normalization: str) -> bool:
    """``normalization`` (``"global"`` or ``"per_tensor"``) checked; whether it is per tensor."""
    return check_choice("normalization", normalization, ("global", "per_tensor")) == "per_tensor"


def below_one(name: str, value: Any) -> float:
    """A decay or sparsity: a number in ``[0, 1)``."""
    return check_range(name, value, 0.0, 1.0, high_open=True)


register("base", "none", "sgd")(Base)
