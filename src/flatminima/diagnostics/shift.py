"""The distribution-shift trial of GA-SAM (Zhang et al., EMNLP 2022, §2.4, Figs. 1–2, Appendix C.1).

GA-SAM's Theorem 1: near the minima, a shift from the training distribution ``D`` to the test
distribution ``D*`` acts as a parameter corruption, ``L(w; D*) ≈ L(w − δ; D) + C`` with
``δ = θ* − θ`` (``θ`` the training minimum, ``θ*`` the minimum fine-tuned on the test data) and
``C = L(θ*; D*) − L(θ; D)``. Two trials check it:

* :func:`shift_trial` (Fig. 1): along ``θ(t) = (1 − t)·θ + t·θ*`` (``t = 0`` the training minimum,
  ``t = 1`` the test minimum; the paper's ``α = 1 − t``), the training loss ``L(θ(t); D)``, the test
  loss ``L(θ(t); D*)`` and the *shifted* training loss ``L(θ(t) − δ; D) + C`` (``θ(t) − δ = θ(t − 1)``
  exactly on the line). The closer the last two, the better a corruption of size ``‖δ‖`` describes
  the shift. For losses that are quadratics with a common Hessian the two are equal.
* :func:`shift_strength` (Fig. 2, Proposition 2): ``‖δ_η‖₂ = ‖θ_η − θ‖₂`` against the mixing ratio
  ``η`` of a mixed data set ``D_mix = (1 − η)·D + η·D*`` (:func:`mixed_dataset`), ``θ_η`` fine-tuned
  from ``θ`` on ``D_mix``; the proposition predicts ``‖δ_η‖ ≈ η·‖δ_1‖`` (a line through the origin).
  The fine-tuned models come from the user (a mapping ``η → model`` or a callable ``finetune(η)``),
  since training is the user's loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..core.validation import check
from .landscape import Endpoint, Line, _grid
from .objective import LossFn, Objective, ParamSpec, batch_size, is_batch
from .robustness import evaluate
from .sharpness import Result, generator


@dataclass
class ShiftTrial(Result):
    """Training, test and shifted training loss along the line from ``θ`` (t = 0) to ``θ*`` (t = 1)."""

    ts: np.ndarray
    train_loss: np.ndarray            #: ``L(θ(t); D)``
    test_loss: np.ndarray             #: ``L(θ(t); D*)``
    shifted_train_loss: np.ndarray    #: ``L(θ(t) − δ; D) + C``
    constant: float                   #: ``C = L(θ*; D*) − L(θ; D)``
    delta_norm: float                 #: ``‖δ‖₂ = ‖θ* − θ‖₂``


def shift_trial(model_a: nn.Module, model_b: Endpoint, loss_fn: LossFn, train_data: Any, test_data: Any,
                ts: Optional[Sequence[float]] = None, params: ParamSpec = "all", buffers: str = "a",
                mode: str = "eval", seed: int = 0, distributed: Optional[bool] = None) -> ShiftTrial:
    """GA-SAM Fig. 1 (module docstring): ``model_a`` is the training minimum ``θ``, ``model_b`` (a
    module or state dict) the test-fine-tuned minimum ``θ*``; ``ts`` default
    ``np.linspace(-0.5, 1.5, 21)``. ``params``/``buffers`` as in :func:`~.landscape.interpolate`.
    ``distributed`` as in :func:`~.landscape.loss_landscape`. Cost: three forward passes over the
    data per ``t``."""
    ts = _grid("ts", np.linspace(-0.5, 1.5, 21) if ts is None else ts)
    train = Objective(model_a, loss_fn, train_data, params, mode, seed, distributed)
    test = Objective(model_a, loss_fn, test_data, params, mode, seed, distributed)
    line = Line(model_a, train.params, model_b, buffers)

    def loss(objective: Objective, t: float) -> float:
        values, bufs = line.at(t)
        return evaluate(objective, values, None, bufs)[0]

    train_loss = np.asarray([loss(train, float(t)) for t in ts])
    test_loss = np.asarray([loss(test, float(t)) for t in ts])
    constant = loss(test, 1.0) - loss(train, 0.0)
    shifted = np.asarray([loss(train, float(t) - 1.0) for t in ts]) + constant
    return ShiftTrial(ts=ts, train_loss=train_loss, test_loss=test_loss, shifted_train_loss=shifted,
                      constant=constant, delta_norm=line.distance())


@dataclass
class ShiftStrength(Result):
    """``‖δ_η‖₂`` against the mixing ratio ``η`` and the line through the origin fitted to it."""

    etas: np.ndarray
    delta_norms: np.ndarray           #: ``‖θ_η − θ‖₂``
    slope: float                      #: least squares ``k`` of ``‖δ_η‖ ≈ k·η``
    r2: float                         #: coefficient of determination of that fit
    ratios: Optional[np.ndarray]      #: ``‖δ_η‖/‖δ_1‖`` when ``η = 1`` is among the ratios (≈ η)


def shift_strength(model: nn.Module,
                   finetuned: Union[Mapping[float, Endpoint], Sequence[Endpoint], Callable[[float], Endpoint]],
                   etas: Optional[Sequence[float]] = None, params: ParamSpec = "all") -> ShiftStrength:
    """GA-SAM Fig. 2: ``‖δ_η‖₂ = ‖θ_η − θ‖₂`` for each mixing ratio ``η`` (module docstring).

    ``model``: the training minimum ``θ``. ``finetuned``: a mapping ``{η: model or state dict}``, a
    list of models/state dicts with their ``etas``, or a callable ``finetune(η)`` returning one (then
    ``etas`` lists the ratios, e.g. ``np.linspace(0.1, 1, 10)``, and each model is dropped once
    measured, so only one is held at a time); a typical callable deep-copies ``model``, trains the copy on
    ``mixed_dataset(train, test, η)`` and returns it. Reports the least-squares slope through the
    origin, its ``r²`` and, when ``η = 1`` is present, ``‖δ_η‖/‖δ_1‖`` (Proposition 2: ``≈ η``).
    """
    if isinstance(finetuned, (list, tuple)):
        check("etas", etas is not None and len(etas) == len(finetuned) > 0, etas,
              "one ratio per fine-tuned model in the list")
        pairs = [(float(eta), other) for eta, other in zip(etas, finetuned)]
    elif callable(finetuned) and not isinstance(finetuned, (Mapping, nn.Module)):
        check("etas", etas is not None and len(etas) > 0, etas, "a non-empty sequence of ratios with a callable")
        pairs = [(float(eta), None) for eta in etas]
    else:
        check("finetuned", isinstance(finetuned, Mapping) and len(finetuned) > 0, type(finetuned).__name__,
              "a non-empty mapping {eta: model or state dict}, a list of them with etas, or a callable finetune(eta)")
        check("etas", etas is None, etas, "None with a mapping (its keys are the ratios)")
        pairs = sorted(((float(k), v) for k, v in finetuned.items()), key=lambda pair: pair[0])
    for eta, _ in pairs:
        check("etas", math.isfinite(eta) and 0.0 <= eta <= 1.0, eta, "ratios in [0, 1]")
    norms = []
    for eta, other in pairs:
        other = finetuned(eta) if other is None else other
        norms.append(Line(model, params, other).distance())
    x, y = np.asarray([e for e, _ in pairs]), np.asarray(norms)
    slope = float((x * y).sum() / (x * x).sum()) if (x * x).sum() > 0 else 0.0
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - slope * x) ** 2).sum()) / total if total > 0 else 1.0
    ones = np.flatnonzero(x == 1.0)
    ratios = y / y[ones[0]] if len(ones) and y[ones[0]] > 0 else None
    return ShiftStrength(etas=x, delta_norms=y, slope=slope, r2=r2, ratios=ratios)


def mixed_dataset(train: Any, test: Any, eta: float, size: Optional[int] = None, seed: int = 0) -> Any:
    """``D_mix``: ``round(η·size)`` examples drawn from ``test`` and the rest from ``train`` (without
    replacement), shuffled; ``size`` defaults to the training set's. ``train`` and ``test`` are one
    batch each, of the same structure (a tensor, a tuple/list or a dict of tensors whose leading
    dimension indexes the examples). Drawn from a generator seeded with ``seed``."""
    check("eta", isinstance(eta, (int, float)) and math.isfinite(eta) and 0.0 <= eta <= 1.0, eta, "a float in [0, 1]")
    check("train", is_batch(train), type(train).__name__, "one batch (a tensor, tuple/list or dict of tensors)")
    check("test", is_batch(test), type(test).__name__, "one batch of the same structure as train")
    n_train, n_test = batch_size(train), batch_size(test)
    size = n_train if size is None else size
    k = int(round(eta * size))
    check("size", isinstance(size, int) and 0 < size and k <= n_test and size - k <= n_train, size,
          f"an int > 0 with round(eta·size) <= {n_test} test and size − round(eta·size) <= {n_train} train examples")
    gen = generator(torch.device("cpu"), seed)
    pick_train = torch.randperm(n_train, generator=gen)[:size - k]
    pick_test = torch.randperm(n_test, generator=gen)[:k]
    order = torch.randperm(size, generator=gen)

    def take(a: Tensor, b: Tensor) -> Tensor:
        both = torch.cat([a[pick_train.to(a.device)], b[pick_test.to(b.device)]])
        return both[order.to(both.device)]

    if torch.is_tensor(train):
        return take(train, test)
    if isinstance(train, dict):
        return type(train)({key: take(v, test[key]) if torch.is_tensor(v) else v for key, v in train.items()})
    return type(train)(take(a, b) if torch.is_tensor(a) else a for a, b in zip(train, test))
