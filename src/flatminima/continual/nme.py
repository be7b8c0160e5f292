r"""Nearest-class-mean evaluation (iCaRL, Rebuffi et al. 2017, "iCaRL: Incremental Classifier and
Representation Learning", §2.1): classify by the nearest class prototype in feature space instead of
by the (biased towards recent classes) linear head.

* ``φ(x)`` is the input of the classification head (captured by a forward pre-hook on ``head``),
  flattened and L2-normalised: ``φ(x) = h(x) / ‖h(x)‖₂``;
* the prototype of class ``c`` is the mean normalised feature of its training samples,
  ``μ_c = 1/|X_c| Σ_{x ∈ X_c} φ(x)`` (computed with the evaluation transform);
* the prediction is the most similar prototype by cosine among the allowed (seen) classes,
  ``ŷ = argmax_{c ∈ C} ⟨φ(x), μ_c⟩ / ‖μ_c‖₂`` — iCaRL's ``argmin ‖φ(x) − μ_c‖`` with the means
  normalised as in its code. Ties go to the first allowed class in the order given.

Prototypes are computed when a class is learned and then kept: an old class's prototype is not
recomputed later (that would need its training data, which exemplar-free continual learning does
not keep), so its drift with the features is part of what the evaluation measures. Nothing here
trains: the model is put in eval mode for the features and its modes are given back, the hook
is removed even when the forward fails.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.validation import check, check_int

__all__ = ["ClassPrototypes", "features", "nme_accuracy", "nme_correct"]


def features(model: nn.Module, head: nn.Module, x: Any) -> Tensor:
    """``φ(x)``: the L2-normalised, flattened input of ``head`` when ``model(x)`` runs (eval mode,
    no grad; modes restored, hook removed), shape ``(n, d)``."""
    check("head", isinstance(head, nn.Module) and any(m is head for m in model.modules()), type(head).__name__,
          "a submodule of model (the classification head)")
    captured: list[Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
        for m, flag in modes:
            m.training = flag
    check("head", len(captured) == 1, f"called {len(captured)} times in one forward", "called exactly once")
    return F.normalize(captured[0].flatten(1), dim=1)


def _device(head: nn.Module, fallback: Tensor) -> torch.device:
    first = next(iter(head.parameters()), None)
    return fallback.device if first is None else first.device


class ClassPrototypes:
    """Class prototypes ``μ_c`` (module docstring), kept from when each class was learned."""

    def __init__(self) -> None:
        self.means: dict[int, Tensor] = {}
        self.counts: dict[int, int] = {}

    @property
    def classes(self) -> list[int]:
        return sorted(self.means)

    def update(self, model: nn.Module, head: nn.Module, batches: Iterable[Any], classes: Sequence[int]) -> None:
        """Compute the prototype of every class in ``classes`` from ``batches`` of ``(x, y)``
        (training data, evaluation transform; samples of other classes are ignored) and store it,
        replacing that class's earlier one; other classes keep theirs. Every class must occur."""
        classes = [int(c) for c in classes]
        check("classes", bool(classes) and len(set(classes)) == len(classes) and min(classes) >= 0, classes,
              "a non-empty list of distinct class indices >= 0")
        sums = counts = position = None
        for x, y in batches:
            f = features(model, head, x)
            if sums is None:
                sums = torch.zeros(len(classes), f.shape[1], dtype=torch.float64, device=f.device)
                counts = torch.zeros(len(classes), dtype=torch.float64, device=f.device)
                position = torch.full((max(classes) + 1,), -1, dtype=torch.long, device=f.device)
                position[torch.tensor(classes, device=f.device)] = torch.arange(len(classes), device=f.device)
            y = y.to(f.device).long()
            where = position[y.clamp(0, len(position) - 1)].masked_fill(y >= len(position), -1)
            keep = where >= 0
            sums.index_add_(0, where[keep], f[keep].to(torch.float64))
            counts.index_add_(0, where[keep], torch.ones_like(where[keep], dtype=torch.float64))
        check("batches", sums is not None, "no batches", "a non-empty iterable of (x, y) batches")
        found = counts.tolist()  # one host sync per update, not per batch
        missing = [c for c, n in zip(classes, found) if n == 0]
        check("classes", not missing, f"{missing} without samples in the batches", "classes that occur in batches")
        means = sums / counts[:, None]
        for k, c in enumerate(classes):
            self.means[c] = means[k].to(f.dtype)
            self.counts[c] = int(found[k])

    def matrix(self, classes: Sequence[int]) -> Tensor:
        """The normalised prototypes ``μ_c / ‖μ_c‖`` of ``classes``, one row each."""
        missing = [int(c) for c in classes if int(c) not in self.means]
        check("allowed_classes", bool(classes) and not missing, missing or classes,
              f"a non-empty list of classes with prototypes ({self.classes})")
        return F.normalize(torch.stack([self.means[int(c)] for c in classes]), dim=1)


def nme_correct(model: nn.Module, head: nn.Module, prototypes: ClassPrototypes, batches: Iterable[Any],
                allowed_classes: Sequence[int]) -> tuple[int, int]:
    """``(correct, n)`` of the nearest-class-mean prediction over ``batches`` of ``(x, y)``."""
    allowed = [int(c) for c in allowed_classes]
    protos = prototypes.matrix(allowed)
    labels = torch.tensor(allowed, device=protos.device)
    correct = torch.zeros((), dtype=torch.long, device=protos.device)
    n = 0
    for x, y in batches:
        f = features(model, head, x).to(protos.dtype)
        predicted = labels[(f @ protos.T).argmax(1)]
        correct += (predicted == y.to(protos.device)).sum()
        n += int(y.shape[0])
    return int(correct), n


def nme_accuracy(model: nn.Module, head: nn.Module, prototypes: ClassPrototypes, x: Tensor, y: Tensor,
                 allowed_classes: Sequence[int], batch_size: int = 256) -> tuple[float, int]:
    """``(accuracy, n)`` of the nearest-class-mean prediction on ``(x, y)`` (module docstring),
    evaluated in chunks of ``batch_size`` on the head's device; accuracy NaN for ``n = 0``."""
    check_int("batch_size", batch_size, 1)
    check("y", torch.is_tensor(y) and torch.is_tensor(x) and y.dim() == 1 and y.shape[0] == x.shape[0],
          getattr(y, "shape", type(y).__name__), "a vector of labels, one per row of x")
    device = _device(head, x)
    chunks = ((x[k:k + batch_size].to(device), y[k:k + batch_size]) for k in range(0, x.shape[0], batch_size))
    correct, n = nme_correct(model, head, prototypes, chunks, allowed_classes)
    return (correct / n if n else float("nan")), n
