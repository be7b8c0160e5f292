"""Refuse framework loops that would drive a flatminima optimizer to a silently different step.

Two idioms that the frameworks' own documentation teaches do not fit a method that runs several
passes per step:

* Accelerate: ``with accelerator.accumulate(model): opt.step(closure)``. The prepared optimizer
  (``AcceleratedOptimizer.step``) calls the inner ``step`` only on the micro-batch that closes a
  window, so the closure never sees the other ``gradient_accumulation_steps − 1`` micro-batches.
* Lightning automatic optimization with ``accumulate_grad_batches > 1``. Lightning runs the
  training step and backward of the accumulating micro-batches itself (the loss divided by the
  accumulation) and then calls ``opt.step(closure)`` on the last one, whose passes start from
  cleared gradients: none of the accumulation semantics of ``TrainStep``. Under ``"16-mixed"`` the
  precision plugin runs Lightning's closure itself, once, and calls ``step()`` without it.

Neither loop calls anything of ours before that first ``step``, so the refusal comes there:
:meth:`~flatminima.core.shell.FlatOptimizer.step` calls :func:`refuse_framework_loop` first, which looks a few frames up
for the framework's step method (matched by code object, so this costs a dict lookup per frame,
and nothing when neither framework is imported). The weights are untouched when it raises.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

from .validation import check

_DEPTH = 16  # frames between the framework's step and ours: wrappers of torch, GradScaler, schedulers

_LIGHTNING_LOOPS = ("lightning.pytorch.loops.optimization.automatic", "pytorch_lightning.loops.optimization.automatic")


def _accelerate(frame_locals: dict, opt: Any, closure: Optional[Callable]) -> None:
    wrapper = frame_locals.get("self")  # in AcceleratedOptimizer.step
    if closure is None or getattr(wrapper, "optimizer", None) is not opt:
        return  # AccelerateStep steps the prepared optimizer without a closure, after its passes
    steps = wrapper.gradient_state.num_steps
    check("Accelerator gradient_accumulation_steps", steps == 1, steps,
          "1 when a flatminima optimizer steps with a closure: Accelerate calls it only on the micro-batch "
          "that closes a window, so the others would be dropped; for gradient accumulation use "
          "flatminima.integrations.accelerate.AccelerateStep(accelerator, model, opt, loss_fn), which runs "
          "every pass of the method over the whole window")


def _lightning(frame_locals: dict, opt: Any, closure: Optional[Callable]) -> None:
    # In _AutomaticOptimization._optimizer_step: `optimizer` is the LightningOptimizer it steps.
    if getattr(frame_locals.get("optimizer"), "optimizer", None) is not opt:
        return
    trainer = frame_locals["self"].trainer
    accumulate = trainer.accumulate_grad_batches
    route = ("flatminima.integrations.lightning.FlatMinimaModule(method, accumulate=N), which runs every "
             "pass of the method over the window of N micro-batches")
    check("Trainer accumulate_grad_batches", accumulate == 1, accumulate,
          f"1 for a flatminima optimizer under automatic optimization; for gradient accumulation use {route}")
    if closure is None and type(opt.perturbation).__name__ != "NoPerturbation":
        check("Trainer precision", False, str(trainer.precision),
              "not '16-mixed' under automatic optimization: its plugin runs Lightning's closure itself, once, "
              f"so the method cannot run its passes; use {route}")


def _handlers() -> dict[Any, Callable[[dict, Any, Optional[Callable]], None]]:
    handlers = {}
    accelerate = sys.modules.get("accelerate.optimizer")
    if accelerate is not None:
        handlers[accelerate.AcceleratedOptimizer.step.__code__] = _accelerate
    for name in _LIGHTNING_LOOPS:
        loop = sys.modules.get(name)
        if loop is not None:
            handlers[loop._AutomaticOptimization._optimizer_step.__code__] = _lightning
    return handlers


def calling_frame(codes, depth: int = _DEPTH):
    """The nearest of the caller's ``depth`` enclosing frames whose code object is in ``codes``
    (None if none is): how a step finds which framework loop called it, without the framework
    having to call anything of ours first."""
    frame = sys._getframe(2)  # the caller's caller: the frames above the step asking
    for _ in range(depth):
        if frame is None:
            return None
        if frame.f_code in codes:
            return frame
        frame = frame.f_back
    return None


def refuse_framework_loop(opt: Any, closure: Optional[Callable]) -> None:
    """Raise ``ValueError`` naming the setting and the flatminima route when ``opt.step`` is being
    called by one of the loops above (module docstring); return otherwise."""
    if "accelerate.optimizer" not in sys.modules and not any(name in sys.modules for name in _LIGHTNING_LOOPS):
        return
    handlers = _handlers()
    frame = calling_frame(handlers)
    if frame is not None:
        handlers[frame.f_code](frame.f_locals, opt, closure)
