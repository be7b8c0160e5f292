"""Hugging Face Accelerate: the pattern for a loop that ``accelerator.prepare``\\ s its model,
optimizer and loader, and a small helper that follows it.

    accelerator = Accelerator(gradient_accumulation_steps=4, mixed_precision="bf16")
    opt = fm.SAM(torch.optim.AdamW(model.parameters(), lr=1e-4), rho=0.05)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    step = AccelerateStep(accelerator, model, opt, loss_fn, max_grad_norm=1.0)
    for batch in loader:
        if step(batch):            # True when the window closed and the optimizer stepped
            sched.step()

The window of ``accelerator.gradient_accumulation_steps`` micro-batches is kept and, when it is
full, every pass of the method runs through the library's engine (:meth:`TrainStep.passes`: the
clean pass over the window, the perturbed passes on its last micro-batch or on all of it, DDP's
``no_sync`` for the passes that only feed a per-rank ε, the BatchNorm policy) under
``accelerator.autocast()``; then the descent gradient is clipped with
``accelerator.clip_grad_norm_`` and ``optimizer.step()`` (the prepared optimizer: it restores
``w`` and runs the base update) and ``zero_grad()`` follow. ``accelerator.accumulate`` and
``accelerator.backward`` are not used: a method needs several passes per window, which they do
not model. Under fp16 (``mixed_precision="fp16"``) the engine scales every pass with the
accelerator's ``GradScaler``, unscales it right after (ε needs true gradients) and hands the
descent gradient back scaled, so ``clip_grad_norm_`` and the prepared optimizer's ``step`` unscale,
clip and skip an overflowing step as usual.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from ..engine import TrainStep
from ..optim import FlatOptimizer
from ..validation import check
from .hf import _flat


class AccelerateStep:
    """Call once per micro-batch; returns True on the micro-batch that completed an optimizer step
    (module docstring). ``loss_fn(model, batch)`` returns the micro-batch's mean loss."""

    def __init__(self, accelerator: Any, model: nn.Module, optimizer: Any, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                 *, accumulation: str = "last", bn: str = "clean", max_grad_norm: Optional[float] = None):
        flat = _flat(optimizer)
        check("optimizer", isinstance(flat, FlatOptimizer), type(optimizer).__name__,
              "a flatminima method (e.g. fm.SAM(base, rho=0.05)), prepared by the accelerator or not")
        if max_grad_norm is not None:
            check("max_grad_norm", max_grad_norm > 0, max_grad_norm, "None or a float > 0")
        self.accelerator, self.model, self.optimizer, self.max_grad_norm = accelerator, model, optimizer, max_grad_norm
        self.loss_fn = loss_fn
        self.engine = TrainStep(model, flat, self._loss, accumulation=accumulation, bn=bn, scaler=accelerator.scaler)
        self.window: list[Any] = []
        self.loss: Optional[torch.Tensor] = None  # the last window's clean loss

    def _loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        with self.accelerator.autocast():
            return self.loss_fn(model, batch)

    def __call__(self, batch: Any) -> bool:
        self.window.append(batch)
        if len(self.window) < self.accelerator.gradient_accumulation_steps:
            return False
        window, self.window = self.window, []
        self.loss = self.engine.passes(window)
        if self.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True
