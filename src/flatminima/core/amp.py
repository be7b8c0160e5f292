"""fp16 ``GradScaler`` support shared by the explicit form and :class:`~flatminima.TrainStep`.

A method's step has several backward passes, and ε needs true gradients, so every pass's
gradients are unscaled right after it with the kernel ``GradScaler.unscale_`` uses, inf/NaN OR-ed
into one flag; the result is then recorded in the scaler's per-optimizer state so that
``scaler.step(opt)`` does not unscale again and skips the step when any pass overflowed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState

from .framework_loops import calling_frame


def enabled(scaler: Optional["torch.amp.GradScaler"]) -> bool:
    """A scaler that scales (``GradScaler(enabled=False)`` and a CUDA scaler without CUDA do not)."""
    return scaler is not None and scaler.is_enabled()


def new_found_inf(device: torch.device) -> Tensor:
    """The flag the passes OR into: float32 whatever the default dtype (the AMP kernels require it)."""
    return torch.zeros(1, dtype=torch.float32, device=device)


def unscale_(scaler: "torch.amp.GradScaler", grads: Sequence[Tensor], found_inf: Tensor) -> None:
    """Divide ``grads`` in place by the scale (per device and dtype), OR-ing inf/NaN into ``found_inf``."""
    inv_scale = scaler._scale.double().reciprocal().float()  # as GradScaler.unscale_: exact in fp64
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), chunk in groups.items():
        flag = new_found_inf(device)
        torch._amp_foreach_non_finite_check_and_unscale_(chunk, flag, inv_scale.to(device))
        found_inf.add_(flag.to(found_inf.device))


def called_by_grad_scaler() -> bool:
    """Whether ``GradScaler.step`` is what calls the optimizer's ``step`` (a look a few frames up:
    only done where a step's passes ran without a scaler, off the hot path)."""
    return calling_frame({torch.amp.GradScaler._maybe_opt_step.__code__}, depth=8) is not None


def record_unscaled(scaler: "torch.amp.GradScaler", optimizer: torch.optim.Optimizer, found_inf: Tensor) -> None:
    """Tell ``scaler`` that ``optimizer``'s gradients are already unscaled, with ``found_inf``.

    ``GradScaler.unscale_`` may run once per step, but a method's step has several passes whose
    gradients must each be unscaled before ε is formed; we unscale them ourselves with the same
    kernel and record the result where ``scaler.step``/``update`` read it.
    """
    state = scaler._per_optimizer_states[id(optimizer)]
    state["stage"] = OptState.UNSCALED
    state["found_inf_per_device"] = {found_inf.device: found_inf}
