"""What a step asks its runner for: passes (forward, and backward unless a probe).

A step is a *plan*: a generator that yields :class:`Pass` requests and receives each pass's loss.
The plan drivers (:mod:`flatminima.core.plan`) answer the requests by calling a closure, by letting
the caller run them (the explicit form), or through :class:`flatminima.TrainStep`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generator, Optional


@dataclass(frozen=True)
class Pass:
    """One forward(/backward) pass a plan asks for.

    ``role``: ``"clean"`` (at ``w``), ``"perturbed"`` (at the perturbed weights) or ``"probe"`` (a
    forward-only evaluation). A step starts with the clean pass unless the method needs no
    clean gradient at all (RWP). ``backward``: whether gradients are needed. ``sync``: whether a DDP
    runner must all-reduce this pass's gradients (passes that only feed a per-rank perturbation do
    not). Every pass with ``backward`` starts from empty ``.grad`` (the driver sets them to None).
    """

    role: str
    backward: bool = True
    sync: bool = True
    #: Under gradient accumulation, run over every micro-batch even when the engine would run a
    #: perturbed pass on the last one only (a step without a clean pass: RWP).
    full_window: bool = False
    #: ``(m, M)``: run on the m-th of M batches (``step(closure, batches=...)``; in ``TrainStep``
    #: the m-th of M groups of micro-batches). None: the step's batch.
    batch: Optional[tuple[int, int]] = None
    #: Factor on the pass's loss before its backward (parallel m-RWP weighs each rank's loss so that
    #: DDP's gradient average is the mix). Runners apply it to the gradient only: the loss a pass
    #: reports is unweighted. A closure applies it itself (``closure(loss_weight=...)``).
    loss_weight: float = 1.0


Plan = Generator[Pass, Any, list]
Runner = Callable[[Pass], Any]
