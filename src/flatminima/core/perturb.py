"""The one perturbation loop: save ``w``, put the model at each point, yield the pass, restore, combine.

A :class:`Perturbation` only *produces* points: its :meth:`~Perturbation.points` generator yields
a :class:`Point` (ε to add to the scoped weights, or a context that puts the model there
functionally, and the pass to run) and receives the pass's :class:`Outcome`. :func:`perturb` does
everything else, once for every method: it keeps the pre-perturbation weights (only if a point
writes them), applies ε, yields the pass to the plan driver, hands each perturbed pass's gradients
to the combination, restores ``w`` exactly (``finally``: also when a pass raises or the step is
abandoned), lets the combination leave the descent gradient in ``.grad`` and collects the commits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Generator, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from . import foreach as fe
from . import kernels as F
from .combine import grads_of
from .passes import Pass, Plan


@dataclass
class Point:
    """A point to visit: ``request`` is the pass to run there. ``eps``: added to the scoped weights
    (a list, which the loop empties once added, so a producer that still needs ε yields a copy of the
    list; or an iterator, consumed one tensor at a time so that no second weight-sized buffer
    exists). ``apply``: a context manager factory that puts the model at the point without writing
    the weights (Flat-LoRA's merged-weight noise). Neither: the point ``w``."""

    request: Pass
    eps: Union[None, list[Tensor], Iterator[Tensor]] = None
    apply: Optional[Callable[[], ContextManager]] = None


class Outcome:
    """What the pass at a point gave: its ``loss`` (what the runner returned) and, read on demand,
    the scoped parameters' gradients."""

    def __init__(self, loss: Any, params: Sequence[Tensor]):
        self.loss, self._params = loss, params

    @property
    def grads(self) -> list[Tensor]:
        return grads_of(self._params)


class PerturbationContext:
    """What a perturbation reads while it makes its points: ``opt``, the scoped ``params`` and their
    parameter-group index ``gidx``, the step's ``clean_loss``, the clean gradient, the ascent
    direction (:meth:`ascent`), per-step scratch space (``memo``) and :meth:`stage` for commits."""

    def __init__(self, opt, params: list[Tensor], gidx: list[int], clean_loss: Any):
        self.opt, self.params, self.gidx, self.clean_loss = opt, params, gidx, clean_loss
        self.memo: dict = {}
        self.commits: list = []

    @property
    def clean_grads(self) -> list[Tensor]:
        """The clean gradient of the scoped parameters (valid until the first pass runs)."""
        return [p.grad for p in self.params]

    def ascent(self, grads: Optional[Sequence[Tensor]] = None, first: bool = True):
        """The optimizer's ascent chain applied to ``grads`` (default: the clean gradient)."""
        with torch.no_grad():
            return self.opt.ascent(self, self.clean_grads if grads is None else grads, first)

    def stage(self, commit: Optional[Callable[[], None]]) -> None:
        """Run ``commit`` after the base step, when the step is taken."""
        if commit is not None:
            self.commits.append(commit)

    def perturbed(self, last: bool = True, **fields: Any) -> Pass:
        """A perturbed pass. It all-reduces its gradients under DDP when it is the last one, when
        earlier passes enter the descent gradient, or with ``sync_perturbation``."""
        combination = self.opt.combination
        sync = (last or combination.uses_clean or combination.uses_intermediate or self.opt.sync_perturbation)
        return Pass("perturbed", backward=True, sync=bool(sync), **fields)


class Perturbation:
    """Makes the points of a step (ε); the loop (:func:`perturb`) visits them."""

    #: Whether the step starts with a pass at ``w`` (also for the loss only)…
    needs_clean_pass = True
    #: …and whether that pass must produce gradients.
    needs_clean_grad = True
    #: The batch index ``(m, M)`` of the clean pass when the method uses several batches.
    clean_batch: Optional[tuple[int, int]] = None
    #: Whether it runs on FSDP2 (DTensor) parameters (checked against single-process runs).
    supports_sharded = False
    #: Keeps a pass's gradient tensors while later passes run (DDP bucket views would overwrite them).
    keeps_gradients = False

    def sharded_ok(self) -> bool:
        """Whether this perturbation, as configured, runs on DTensor parameters."""
        return self.supports_sharded

    @property
    def batch_count(self) -> Optional[int]:
        """M when the passes run on M different batches (``step(closure, batches=...)``)."""
        return None

    def check_ascent(self, ascent) -> None:
        """Refuse (``ValueError``) an ascent chain this perturbation cannot follow; by default any."""

    def trigger_grads(self, grads: list[Tensor]) -> list[Tensor]:
        """The clean gradients an adaptive trigger measures (``‖g‖²``): the scoped ones by default."""
        return grads

    def clean_context(self, opt) -> Optional[Callable[[], ContextManager]]:
        """A context the clean pass runs in, for gradients only that pass gives (those of frozen
        weights, for a support on them), or None. Only the closure form and ``TrainStep`` run the
        clean pass themselves: the explicit form refuses a perturbation that has one."""
        return None

    def points(self, ctx: PerturbationContext) -> Generator[Point, Outcome, None]:
        """Yield the step's points, receiving each pass's :class:`Outcome`."""
        return
        yield  # pragma: no cover

    def finish(self, ctx: PerturbationContext) -> Optional[Callable[[], None]]:
        """After the combination (``.grad`` holds the descent gradient): an optional commit."""
        return None

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class NoPerturbation(Perturbation):
    """The base optimizer alone (the reference every method reduces to)."""

    supports_sharded = True


def _add_(params: Sequence[Tensor], eps: Union[list[Tensor], Iterator[Tensor]]) -> None:
    with torch.no_grad():
        if isinstance(eps, list):
            if eps:
                fe.add_(list(params), eps)
            eps.clear()
        else:
            for p, e in zip(params, eps):
                p.add_(e)


def perturb(opt, clean_loss: Any) -> Plan:
    """The sub-plan of a step that perturbs: visit the perturbation's points, then combine.

    Returns the commits (the perturbation's staged state, the combination's, the perturbation's
    own after the combination), run by the optimizer after the base step."""
    perturbation, combination = opt.perturbation, opt.combination
    params, gidx = opt.scoped_params(with_grad=perturbation.needs_clean_grad)
    ctx = PerturbationContext(opt, params, gidx, clean_loss)
    producer = perturbation.points(ctx)
    saved: Optional[list[Tensor]] = None
    moved, started, state, passes = False, False, None, 0
    try:
        point = next(producer, None)
        while point is not None:
            request = point.request
            if point.eps is not None:
                if saved is None:
                    saved = F.clone(params)
                elif moved:
                    F.restore_(params, saved)
                _add_(params, point.eps)
                moved = True
                opt.note_perturbation(params, saved)
            elif moved:
                F.restore_(params, saved)
                moved = False
                opt.note_perturbation(params, params)  # back at w (random search chose it): ‖ε‖ = 0
            if request.role == "perturbed" and not started:
                state, started = combination.start(opt, opt.all_params_with_grad()), True
            with point.apply() if point.apply is not None else contextlib.nullcontext():
                point = None  # ε is in the weights: nothing weight-sized is held through the pass
                loss = yield request
            if request.role == "perturbed" and request.backward:
                passes += 1
                combination.after_pass(state, opt.all_params_with_grad())
            try:
                point = producer.send(Outcome(loss, params))
            except StopIteration:
                point = None
    finally:
        producer.close()
        if moved:
            F.restore_(params, saved)
    commits = list(ctx.commits)
    if started:
        commits.append(combination.finish(opt, state, opt.all_params_with_grad(), passes))
    commits.append(perturbation.finish(ctx))
    return [c for c in commits if c is not None]
