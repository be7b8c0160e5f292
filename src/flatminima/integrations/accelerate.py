"""Hugging Face Accelerate: the pattern for a loop that ``accelerator.prepare``\\ s its model,
optimizer and loader, and a small helper that follows it (needs only ``accelerate``: the
``flatminima[accelerate]`` extra).

    accelerator = Accelerator(gradient_accumulation_steps=4, mixed_precision="bf16")
    opt = fm.SAM(torch.optim.AdamW(model.parameters(), lr=1e-4), rho=0.05)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    step = AccelerateStep(accelerator, model, opt, loss_fn, max_grad_norm=1.0)
    for batch in loader:
        if step(batch):            # a StepResult when the window closed and the optimizer stepped
            sched.step()

The window of ``accelerator.gradient_accumulation_steps`` micro-batches is kept and, when it is
full, every pass of the method runs through the library's engine (:meth:`TrainStep.passes`: the
clean pass over the window, the perturbed passes on its last micro-batch or on all of it, DDP's
``no_sync`` for the passes that only feed a per-rank ε, the BatchNorm policy) under
``accelerator.autocast()``; then the descent gradient is clipped with
``accelerator.clip_grad_norm_`` and ``optimizer.step()`` (the prepared optimizer: it restores
``w`` and runs the base update) and ``zero_grad()`` follow. At the end of a loader the accelerator
prepared (``gradient_state.end_of_dataloader``) a partial window is stepped, as Accelerate's own
``accumulate`` does (10 micro-batches with accumulation 4: windows of 4, 4 and 2); each window's
gradient is the mean over its own micro-batches, as in :class:`TrainStep`. ``flush()`` steps a
partial window by hand (a loader the accelerator did not prepare).

``accelerator.accumulate`` and ``accelerator.backward`` are not used: a method needs several
passes per window, which they do not model. ``with accelerator.accumulate(model): opt.step(closure)``
would call the closure on the window's last micro-batch only, so a flatminima optimizer refuses it
(:mod:`flatminima.core.framework_loops`) when ``gradient_accumulation_steps > 1``.

Under fp16 (``mixed_precision="fp16"``) the engine scales every pass with the accelerator's
``GradScaler``, unscales it right after (ε needs true gradients) and hands the descent gradient back
scaled, so ``clip_grad_norm_`` and the prepared optimizer's ``step`` unscale, clip and skip an
overflowing step as usual.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from .._extras import require
from ..engine import StepResult, TrainStep
from ..core.shell import FlatOptimizer
from ..core.validation import check, check_positive

_accelerate_optimizer = require("accelerate.optimizer", "accelerate", "flatminima.integrations.accelerate")


def _flat(optimizer: Any) -> Optional[FlatOptimizer]:
    """The flatminima optimizer inside a (possibly accelerate- or Trainer-wrapped) optimizer."""
    while optimizer is not None and not isinstance(optimizer, FlatOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class AccelerateStep:
    """Call once per micro-batch; returns a :class:`~flatminima.engine.StepResult` (the window's
    clean loss, ``skipped`` under fp16, ``grad_norm`` when clipping) on the micro-batch that
    completed an optimizer step, ``None`` on the others (module docstring). ``loss_fn(model, batch)``
    returns the micro-batch's mean loss."""

    def __init__(self, accelerator: Any, model: nn.Module, optimizer: Any, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                 *, accumulation: str = "last", bn: str = "clean", max_grad_norm: Optional[float] = None):
        flat = _flat(optimizer)
        check("optimizer", isinstance(flat, FlatOptimizer), type(optimizer).__name__,
              "a flatminima method (e.g. fm.SAM(base, rho=0.05)), prepared by the accelerator or not")
        prepared = isinstance(optimizer, _accelerate_optimizer.AcceleratedOptimizer)
        check("optimizer", prepared or accelerator.scaler is None, type(optimizer).__name__,
              "the optimizer returned by accelerator.prepare under fp16 (its step unscales the gradient)")
        if max_grad_norm is not None:
            check_positive("max_grad_norm", max_grad_norm)
        self.accelerator, self.model, self.optimizer, self.max_grad_norm = accelerator, model, optimizer, max_grad_norm
        self.loss_fn = loss_fn
        self.engine = TrainStep(model, flat, self._loss, accumulation=accumulation, bn=bn, scaler=accelerator.scaler)
        self.window: list[Any] = []
        self.loss: Optional[torch.Tensor] = None  # the last window's clean loss

    def _loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        with self.accelerator.autocast():
            return self.loss_fn(model, batch)

    def __call__(self, batch: Any) -> Optional[StepResult]:
        self.window.append(batch)
        state = self.accelerator.gradient_state
        end = state.sync_with_dataloader and state.end_of_dataloader
        if len(self.window) < self.accelerator.gradient_accumulation_steps and not end:
            return None
        return self.flush()

    def flush(self) -> Optional[StepResult]:
        """Run the optimizer step on the micro-batches collected so far (``None`` if there are none)."""
        if not self.window:
            return None
        # The prepared optimizer steps only while sync_gradients holds: outside accelerator.accumulate
        # it always does; inside it, Accelerate's window could disagree with ours and drop the step.
        check("accelerator.sync_gradients", self.accelerator.gradient_state.sync_gradients, False,
              "True: call AccelerateStep outside `with accelerator.accumulate(model)`, it keeps the window itself")
        window, self.window = self.window, []
        self.loss = self.engine.passes(window)
        grad_norm = None
        if self.max_grad_norm is not None:
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        skipped = getattr(self.optimizer, "step_was_skipped", None) if self.accelerator.scaler is not None else None
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(self.loss.detach(), skipped, grad_norm)
