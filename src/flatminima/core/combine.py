"""Combinations: which gradient drives the base step, and what happens after it.

A combination sees the clean gradient (:meth:`Combination.start`), the gradient of every perturbed
pass (:meth:`Combination.after_pass`), leaves the descent gradient in ``.grad``
(:meth:`Combination.finish`) and may return a commit: a callable run *after the base optimizer's
step*, only when the step is taken. Commits store method state (LookSAM's direction) or update
the weights outside the base optimizer (decoupled WSAM). A combination may keep the gradient
tensors of the passes it has seen (each pass writes fresh ``.grad`` tensors) and combine them in
place; the perturbation reads a pass's gradients before the combination sees the next one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from . import foreach as fe
from . import kernels as F
from .state import StateSlot

if TYPE_CHECKING:  # the shell imports this module
    from .shell import FlatOptimizer


class Combination:
    """Turns the gradients of a step's passes into the descent gradient."""

    #: The clean gradient enters the descent gradient (so under DDP the clean pass must sync).
    uses_clean = False
    #: The gradients of the passes before the last one enter it too (so they sync as well).
    uses_intermediate = False
    #: A commit writes the weights after the base step (refused where the weights the module
    #: holds are not the ones the optimizer updates: DeepSpeed's partitioned master weights).
    writes_weights_after_step = False

    def start(self, opt: "FlatOptimizer", params: list[Tensor]) -> Any:
        """Called once the clean gradient is in ``.grad`` and before the first perturbed pass."""
        return None

    def after_pass(self, state: Any, params: list[Tensor]) -> None:
        """Called after each perturbed pass, with its gradients in ``.grad``."""

    def finish(self, opt: "FlatOptimizer", state: Any, params: list[Tensor], passes: int) -> Optional[Callable[[], None]]:
        """Leaves the descent gradient in ``.grad``; may return a commit, run after the base step
        when the step is taken (method state, or a weight update outside the base optimizer)."""
        return None

    def off_step(self, opt: "FlatOptimizer", params: list[Tensor]) -> None:
        """A step whose trigger did not fire: ``.grad`` holds the clean gradient."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PerturbedGradient(Combination):
    """Descend along ``∇L(w + ε)`` (SAM and its single-point variants)."""


def grads_of(params: Sequence[Tensor]) -> list[Tensor]:
    """The gradients of ``params`` (zeros where a parameter got none)."""
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def set_grads(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """Make ``grads`` the ``.grad`` of ``params`` (the descent gradient the base optimizer reads)."""
    for p, g in zip(params, grads):
        p.grad = g


class KeepsClean(Combination):
    """A combination of the clean gradient with the last perturbed pass's: :meth:`start` keeps the
    clean gradient tensors (references: the next pass writes fresh ``.grad`` tensors), and
    ``finish`` receives ``state = (params, clean)``."""

    uses_clean = True

    def start(self, opt, params):
        return params, grads_of(params)


class MeanGradient(Combination):
    """Descend along the mean of the gradients of the step's passes: ``∇L(w + a_k)`` over
    ``k = 0..K`` with the clean one (GA-SAM eq. 14, ``a_0 = 0``), or over the perturbed passes
    alone (``include_clean=False``: LPF-SGD's Monte Carlo mean)."""

    uses_intermediate = True

    def __init__(self, include_clean: bool = True):
        self.uses_clean = include_clean

    def __repr__(self) -> str:
        return f"MeanGradient(include_clean={self.uses_clean})"

    def start(self, opt, params):
        # References, not copies: the next pass writes fresh .grad tensors.
        return [params, grads_of(params) if self.uses_clean else None]

    def after_pass(self, state, params):
        if state[1] is None:
            state[0], state[1] = params, grads_of(params)
        else:
            fe.add_(state[1], grads_of(state[0]))

    def finish(self, opt, state, params, passes):
        params, total = state
        fe.div_(total, float(passes + int(self.uses_clean)))
        set_grads(params, total)
        return None


class LookSAMGradient(KeepsClean):
    """LookSAM (Liu et al. 2022): reuse the SAM-specific part of the gradient between SAM steps.

    On a SAM step store ``g_v = g_s − (⟨g, g_s⟩/‖g‖²)·g`` (``g_s`` the perturbed and ``g`` the clean
    gradient; this is ``g_s − ‖g_s‖cos(g, g_s)·g/‖g‖``) and descend along ``g_s``; on the other
    steps descend along ``g + α·(‖g‖/‖g_v‖)·g_v``. The weights are always restored from the copy
    taken at this step, never from a stale one.
    """

    slot = StateSlot("looksam")

    def __init__(self, alpha: float):
        self.alpha = alpha

    def __repr__(self) -> str:
        return f"LookSAMGradient(alpha={self.alpha})"

    def finish(self, opt, state, params, passes):
        params, clean = state
        g_v = F.reject(grads_of(params), onto=clean)
        return self.slot.write(opt, params, "gv", g_v)

    def off_step(self, opt, params):
        pairs = [(p, v) for p, v in zip(params, self.slot.read(opt, params, "gv")) if p.grad is not None and v is not None]
        if not pairs:
            return
        grads, g_v = [p.grad for p, _ in pairs], [v for _, v in pairs]
        coef = self.alpha * F.global_norm(grads) / F.global_norm(g_v).clamp_min(F.TINY)
        fe.add_(grads, fe.mul(g_v, coef))


class MixGradient(KeepsClean):
    """Descend along ``λ·∇L(w + ε) + (1 − λ)·∇L(w)``, ``λ = noisy_weight``: m-RWP (Li et al. 2024,
    eq. 8), and coupled WSAM with ``λ = γ/(1 − γ)`` (any real λ: WSAM's is above 1)."""

    def __init__(self, noisy_weight: float):
        self.noisy_weight = noisy_weight

    def __repr__(self) -> str:
        return f"MixGradient(noisy_weight={self.noisy_weight})"

    def finish(self, opt, state, params, passes):
        clean_params, clean = state
        noisy = grads_of(clean_params)
        fe.mul_(noisy, self.noisy_weight)
        fe.add_(noisy, clean, alpha=1.0 - self.noisy_weight)
        set_grads(clean_params, noisy)
        return None


class SurrogateGap(KeepsClean):
    """GSAM (Zhuang et al., ICLR 2022): descend along ``g_a − α·g⊥``, ``g⊥ = g − (⟨g, g_a⟩/‖g_a‖²)·g_a``
    the clean gradient's component orthogonal to the perturbed one (``reject(g, onto=g_a)``), which
    lowers the surrogate gap ``L(w + ε) − L(w)`` without changing the perturbed loss to first order."""

    def __init__(self, alpha: float):
        self.alpha = alpha

    def __repr__(self) -> str:
        return f"SurrogateGap(alpha={self.alpha})"

    def finish(self, opt, state, params, passes):
        params, clean = state
        perturbed = grads_of(params)
        fe.add_(perturbed, F.reject(clean, onto=perturbed), alpha=-self.alpha)
        set_grads(params, perturbed)
        return None


class DecoupledSharpness(KeepsClean):
    """Decoupled WSAM (Yue et al., KDD 2023): the base optimizer steps on the clean gradient ``g``,
    then, after its step, ``w ← w − lr·α·(g_a − g)`` for each parameter group's ``lr`` (the
    sharpness term outside the base optimizer: its momentum and adaptive scaling never see it)."""

    writes_weights_after_step = True

    def __init__(self, alpha: float):
        self.alpha = alpha

    def __repr__(self) -> str:
        return f"DecoupledSharpness(alpha={self.alpha})"

    def finish(self, opt, state, params, passes):
        params, clean = state
        sharpness = fe.sub(grads_of(params), clean)
        set_grads(params, clean)
        group_of = {id(p): i for i, group in enumerate(opt.param_groups) for p in group["params"]}
        by_group: dict[int, tuple[list, list]] = {}
        for p, s in zip(params, sharpness):
            ps, ss = by_group.setdefault(group_of[id(p)], ([], []))
            ps.append(p)
            ss.append(s)

        def after_base_step() -> None:
            with torch.no_grad():
                for i, (ps, ss) in by_group.items():
                    fe.add_(ps, ss, alpha=-float(opt.param_groups[i]["lr"]) * self.alpha)

        return after_base_step
