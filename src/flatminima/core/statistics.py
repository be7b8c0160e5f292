"""Per-step statistics of a method (losses, gradient norms, ‖ε‖, cosine), kept on the device.

:class:`StatisticsTracker` is mixed into :class:`~flatminima.core.shell.FlatOptimizer`: the plan
driver folds every pass into the pending record and publishes it as ``opt.statistics`` when the
step is taken.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from . import foreach as fe
from . import kernels as F
from .passes import Pass
from .validation import check


class StatisticsTracker:
    """``track_statistics()`` and the bookkeeping behind it."""

    def track_statistics(self, enabled: bool = True, cosine: bool = True) -> None:
        """Record, for every step taken, :attr:`statistics`: ``clean_loss`` and ``grad_norm`` (the
        clean pass), ``perturbed_loss`` and ``perturbed_grad_norm`` (the last perturbed pass),
        ``sharpness = perturbed_loss − clean_loss``, ``eps_norm`` (‖ε‖₂ of the last perturbation,
        for methods that write ε into the weights) and, with ``cosine``, ``cosine`` between the
        clean and the perturbed gradient (this keeps a copy of the clean gradient during the step).
        Values are 0-dim tensors (no host sync); a key is absent when the step had no such pass
        (RWP has no clean pass; a trigger that does not fire has no perturbed one). Losses are
        known when the step runs through ``step(closure)`` or :class:`~flatminima.TrainStep`."""
        check("enabled", isinstance(enabled, bool), enabled, "True or False")
        self._tracking = {"cosine": bool(cosine), "pending": {}, "clean_grad": None} if enabled else None
        self.statistics = {}

    def note_perturbation(self, params: Sequence[Tensor], saved: Sequence[Tensor]) -> None:
        """Called by a perturbation with the weights at ``w + ε`` and the saved ``w``: records
        ``‖ε‖₂`` when statistics are tracked (a no-op otherwise)."""
        if self._tracking is not None and params:
            with torch.no_grad():
                self._tracking["pending"]["eps_norm"] = F.global_norm(fe.sub(list(params), list(saved)))

    def _observe(self, request: Optional[Pass], loss: Any) -> None:
        """Fold one pass's loss and gradient into the step's pending statistics."""
        track = self._tracking
        if track is None or request is None:
            return
        pending, clean = track["pending"], request.role == "clean"
        if torch.is_tensor(loss) or isinstance(loss, (int, float)):
            pending["clean_loss" if clean else "perturbed_loss"] = torch.as_tensor(loss).detach().reshape(())
        if not request.backward or request.role == "probe":
            return
        with torch.no_grad():
            grads = [p.grad for p in self.all_params_with_grad()]
            if not grads:
                return
            norm = F.global_norm(grads)
            if clean:
                pending["grad_norm"] = norm
                if track["cosine"]:
                    track["clean_grad"] = F.clone(grads)
            else:
                pending["perturbed_grad_norm"] = norm
                reference = track["clean_grad"]
                if reference is not None and len(reference) == len(grads):
                    dot = torch.stack([(a.double() * b.double()).sum() for a, b in zip(grads, reference)]).sum()
                    pending["cosine"] = (dot / (norm.double() * F.global_norm(reference).double())).float()
