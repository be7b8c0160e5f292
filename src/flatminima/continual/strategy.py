"""Continual-learning baselines that compose with any flat-minima method, and how a strategy is named.

A continual *strategy* is an adapter lifecycle (:data:`~flatminima.continual.adapters.STRATEGIES`:
``seq-lora``, ``inc-lora``, ``o-lora``, ``n-lora``, ``finetune``) followed by zero or more
*baselines* joined with ``+``: ``seq-lora+ewc``, ``inc-lora+inflora``, ``finetune+replay+lwf``.
A baseline acts through five hooks, each optional, that the training loop calls around whatever
method of the registry trains the task (SGD, SAM, Flat-LoRA, …):

* :meth:`Baseline.start_task` / :meth:`Baseline.end_task`: before and after a task (designs a new
  adapter, computes a Fisher, updates a memory), given a :class:`TaskContext`;
* :meth:`Baseline.extend_batch`: the training batch (replay appends buffered examples);
* :meth:`Baseline.loss`: the data loss of one pass, given the pass's logits (LwF adds its
  distillation term); it runs in every pass of the method, at the pass's weights, like the data loss;
* :meth:`Baseline.penalty`: a regularizer ``R(model)`` (EWC); the loop adds it either in every pass
  or once, at the unperturbed weights (``regularizer_at``, see :class:`~flatminima.engine.TrainStep`);
* :meth:`Baseline.project`: edits the step's *descent gradient* in ``.grad`` in place, once per
  step, at the unperturbed weights, before clipping and the base optimizer's update (A-GEM, GPM,
  OGD). So a projection acts on the gradient the method would follow (SAM's ``∇L(w + ε)``), not
  on the clean gradient only.

Baselines are registered by name (:data:`BASELINES`, :func:`register_baseline`) as classes taking
keyword options (``strategy_options`` of the experiment config, per strategy name).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ..core.registry import Registry
from ..core.validation import check
from .adapters import STRATEGIES

#: Baseline classes by name (``ewc``, ``replay``, ``agem``, ``gpm``, ``ogd``, ``inflora``, ``lwf``, …).
BASELINES: Registry[type] = Registry("continual baseline")


def register_baseline(name: str, *aliases: str) -> Callable[[type], type]:
    """Class decorator registering a :class:`Baseline` under ``name``."""
    return BASELINES.register(name, *aliases)


@dataclass
class TaskContext:
    """What a baseline sees of the run at a task boundary.

    ``index``: the task's position in the order; ``model``; ``loss_fn(model, batch)``: the task's
    training loss (logits masked as the run trains); ``memory_loss_fn(model, batch)``: the
    cross-entropy with logits masked to ``seen_classes`` (for examples of earlier tasks: replay,
    A-GEM's reference gradient); ``batches(n)``: an iterator over at most ``n`` training batches of
    the task (``None``: one epoch) in a fixed order, inputs and labels on the model's device, with
    the evaluation transform (no augmentation); ``parameters``: the tensors
    trained in this task; ``classes``: the task's global labels; ``seen_classes``: every label
    seen so far, this task's included; ``seed``: the task's seed (derive generators from it; never
    use the global RNG); ``device``.
    """

    index: int
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], Tensor]
    memory_loss_fn: Callable[[nn.Module, Any], Tensor]
    batches: Callable[[Optional[int]], Iterator[tuple[Any, Tensor]]]
    parameters: Sequence[Tensor]
    classes: Sequence[int]
    seen_classes: Sequence[int]
    seed: int
    device: torch.device


class Baseline:
    """Base class: every hook does nothing. Subclasses override what they need and set the
    matching ``has_*`` flag so the loop skips the others at no cost."""

    #: names of the hooks this baseline uses; the loop calls only these
    has_penalty = False
    has_loss = False
    has_batch = False
    has_projection = False

    def start_task(self, context: TaskContext) -> None:
        """Before task ``context.index`` trains (its adapter exists and requires grad)."""

    def end_task(self, context: TaskContext) -> None:
        """After task ``context.index`` trained (weights final for the task, before the adapter fold)."""

    def extend_batch(self, batch: tuple[Any, Tensor]) -> tuple[Any, Tensor]:
        """The batch the step trains on (called once per step, before it is cut into micro-batches)."""
        return batch

    def loss(self, model: nn.Module, batch: tuple[Any, Tensor], logits: Tensor, loss: Tensor) -> Tensor:
        """The loss of one pass given the pass's ``logits`` (unmasked) on ``batch`` and the task's
        ``loss`` from them (called in every pass)."""
        return loss

    def penalty(self, model: nn.Module) -> Optional[Tensor]:
        """A scalar added to the loss (see ``regularizer_at``), or None."""
        return None

    def project(self, model: nn.Module) -> None:
        """Edit the descent gradient in ``.grad`` in place (weights at ``w``)."""

    def state(self) -> dict[str, Any]:
        """JSON-ready numbers worth recording (memory sizes, subspace ranks, …)."""
        return {}


def split_strategy(strategy: str) -> tuple[str, list[str]]:
    """``"seq-lora+ewc+replay"`` → ``("seq-lora", ["ewc", "replay"])``, names validated."""
    check("strategy", isinstance(strategy, str) and bool(strategy), strategy,
          f"a name from {', '.join(STRATEGIES)}, optionally followed by +baseline")
    lifecycle, *baselines = [p.strip() for p in strategy.split("+")]
    check("strategy", lifecycle in STRATEGIES, strategy,
          f"a lifecycle from {', '.join(STRATEGIES)} first, then +baseline from {', '.join(BASELINES.names())}")
    for name in baselines:
        check("strategy", name in BASELINES, name, f"a baseline from {', '.join(BASELINES.names())}")
    check("strategy", len(set(baselines)) == len(baselines), strategy, "each baseline at most once")
    return lifecycle, baselines


def make_baselines(strategy: str, options: Optional[dict[str, dict[str, Any]]] = None, *,
                   model: nn.Module, seed: int, lifecycle: Any = None) -> list[Baseline]:
    """The baselines of ``strategy``, built with ``options[name]`` (keyword arguments) plus the
    ``model``, ``seed`` and ``lifecycle`` (the run's :class:`~flatminima.continual.ContinualLoRA`,
    for a baseline that must refuse a lifecycle it cannot work with before anything trains) when
    their constructor takes them."""
    options = options or {}
    built = []
    for name in split_strategy(strategy)[1]:
        cls = BASELINES.get(name)
        kwargs = dict(options.get(name, {}))
        params = inspect.signature(cls).parameters
        if "model" in params:
            kwargs["model"] = model
        if "seed" in params:
            kwargs.setdefault("seed", seed)
        if "lifecycle" in params and lifecycle is not None:
            kwargs["lifecycle"] = lifecycle
        built.append(cls(**kwargs))
    return built


__all__ = ["BASELINES", "Baseline", "TaskContext", "make_baselines", "register_baseline", "split_strategy"]
