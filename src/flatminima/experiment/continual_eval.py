"""Losses and evaluations of a continual run: which logits a task trains and is scored on.

Labels live in the sequence's global label space; a *mask* adds ``-inf`` to the logits of the
classes a prediction may not take (their gradient is 0). For task ``i`` scored after training
task ``j`` (``seen(j)``: the classes of tasks ``0..j``):

* ``task`` (task-aware, the task identity given): the classes of task ``i``;
* ``class`` (task-agnostic, class-incremental): the classes seen so far, ``seen(j)``; for a task not
  trained yet (``i > j``, the entries forward transfer reads) ``seen(j) ∪ classes(i)``, so the entry
  measures what the model knows of task ``i`` before training on it instead of being 0 by
  construction;
* ``domain`` (one label space): every logit;
* ``nme`` (nearest class mean, Rebuffi et al., CVPR 2017): no logits; the normalised feature the
  head reads is matched by cosine similarity to class prototypes, over the same classes as
  ``class`` (``domain``: all). Prototypes of a class are computed from its task's training data
  when the task has been learned and kept (no data of old tasks is revisited); a task not trained
  yet gets temporary prototypes from its own training data at the current weights.

Training (``train_logits``): ``task`` (the current task's classes: the rule of L2P, CODA-Prompt and
InfLoRA for class-incremental training), ``seen`` (every class so far) or ``all``. A baseline that
adds examples of earlier tasks to the batch (replay) trains over ``seen`` classes at least.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..continual.nme import ClassPrototypes, nme_correct
from ..continual.strategy import Baseline
from ..data import inputs_to, take
from .continual_settings import EVALUATIONS, TRAIN_LOGITS
from .training import evaluate_data, logits, ordered_train_batches, streams


def logit_mask(num_classes: int, classes: Optional[Sequence[int]], device: torch.device) -> Optional[torch.Tensor]:
    """0 on ``classes``, ``-inf`` elsewhere; None when every class is allowed."""
    if classes is None or len(set(classes)) == num_classes:
        return None
    mask = torch.full((num_classes,), float("-inf"), device=device)
    mask[sorted(set(classes))] = 0.0
    return mask


def allowed_classes(evaluation: str, classes: Sequence[Sequence[int]], i: int, j: int) -> Optional[list[int]]:
    """The labels a prediction on task ``i`` may take after training task ``j`` (None: all)."""
    if evaluation == "task":
        return list(classes[i])
    if evaluation == "domain":
        return None
    seen = {c for t in classes[:j + 1] for c in t}
    return sorted(seen | (set(classes[i]) if i > j else set()))


def train_classes(train_logits: str, classes: Sequence[Sequence[int]], j: int, replays: bool) -> Optional[list[int]]:
    """The labels task ``j`` trains over (``replays``: a baseline adds earlier tasks' examples)."""
    if train_logits == "all":
        return None
    if train_logits == "seen" or replays:
        return sorted({c for t in classes[:j + 1] for c in t})
    return list(classes[j])


def task_loss(mask: Optional[torch.Tensor], baselines: Sequence[Baseline] = ()) -> Callable[[nn.Module, Any], torch.Tensor]:
    """Cross-entropy over the unmasked classes, then each baseline's :meth:`~Baseline.loss` term
    (LwF's distillation) from the same logits: one forward per pass."""
    hooks = [b for b in baselines if b.has_loss]

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        out = logits(model, x)
        loss = F.cross_entropy(out if mask is None else out + mask.to(out.dtype), y)
        for b in hooks:
            loss = b.loss(model, batch, out, loss)
        return loss

    return loss_fn


def prototype_batches(data: Any, batch_size: int, device: torch.device) -> list:
    """A task's training data without augmentation, in batches (what its class prototypes average)."""
    return list(ordered_train_batches(data, batch_size, device))


def test_batches(data: Any, batch_size: int, device: torch.device, limit: Optional[int] = None) -> list:
    """At most ``limit`` test batches of a task, on ``device``."""
    out = []
    if streams(data):
        for x, y in data.test_loader(batch_size):
            if limit is not None and len(out) >= limit:
                break
            out.append((inputs_to(x, device), y.to(device)))
        return out
    n = len(data.y_test)
    for i in range(0, n, batch_size):
        if limit is not None and len(out) >= limit:
            break
        out.append((inputs_to(take(data.x_test, slice(i, i + batch_size)), device),
                    data.y_test[i:i + batch_size].to(device)))
    return out


class Evaluator:
    """Scores every task of a sequence after each task, for each evaluation of the run."""

    def __init__(self, tasks: Sequence[Any], num_classes: int, evaluations: Sequence[str], batch_size: int,
                 device: torch.device, head: Optional[nn.Module] = None):
        self.tasks, self.num_classes, self.evaluations = list(tasks), num_classes, list(evaluations)
        self.classes = [list(t.classes) for t in tasks]
        self.batch_size, self.device, self.head = batch_size, device, head
        self.prototypes = ClassPrototypes() if "nme" in evaluations else None
        self._domain = "domain" in evaluations

    def learned(self, model: nn.Module, j: int) -> None:
        """Task ``j`` has been trained: keep its classes' prototypes (NME)."""
        if self.prototypes is not None:
            batches = prototype_batches(self.tasks[j].data, self.batch_size, self.device)
            self.prototypes.update(model, self.head, batches, self.classes[j])

    def _nme(self, model: nn.Module, i: int, j: int) -> tuple[float, float]:
        allowed = allowed_classes("domain" if self._domain else "class", self.classes, i, j)
        allowed = list(range(self.num_classes)) if allowed is None else allowed
        prototypes = self.prototypes
        if i > j:  # not learned yet: temporary prototypes of its classes at the current weights
            prototypes = copy.deepcopy(self.prototypes)
            prototypes.update(model, self.head, prototype_batches(self.tasks[i].data, self.batch_size, self.device),
                              self.classes[i])
        correct, total = nme_correct(model, self.head, prototypes,
                                     test_batches(self.tasks[i].data, self.batch_size, self.device), allowed)
        return correct / total, float("nan")

    def during(self, model: nn.Module, evaluation: str, j: int) -> tuple[float, float]:
        """``(accuracy, loss)`` on task ``j`` while it trains (its learning curve)."""
        mask = logit_mask(self.num_classes, allowed_classes(evaluation, self.classes, j, j), self.device)
        return evaluate_data(model, self.tasks[j].data, self.batch_size, mask)

    def scores(self, model: nn.Module, j: int) -> dict[str, list[tuple[float, float]]]:
        """``{evaluation: [(accuracy, loss) per task]}`` after task ``j`` (``j = -1``: before training)."""
        out = {}
        for e in self.evaluations:
            row = []
            for i, task in enumerate(self.tasks):
                if e == "nme":
                    row.append(self._nme(model, i, j))
                    continue
                allowed = allowed_classes(e, self.classes, i, j)
                mask = logit_mask(self.num_classes, allowed, self.device)
                row.append(evaluate_data(model, task.data, self.batch_size, mask))
            out[e] = row
        return out


__all__ = ["EVALUATIONS", "Evaluator", "TRAIN_LOGITS", "allowed_classes", "logit_mask", "task_loss", "test_batches",
           "train_classes"]
