"""First-order flatness: GAM and C-Flat, three perturbed points around ``w`` and their combinations.

Both visit the points of :class:`~flatminima.core.perturbations.GradientNormAscent`, whose
gradients are ``g₁`` (SAM's point), ``g₂`` (after an ascent on the gradient norm) and ``g₃`` (SAM's
point seen from there); ``g₀`` is the clean gradient. They differ in what they descend along.
"""

from __future__ import annotations

import math
from typing import Optional


from ..core import foreach as fe
from ..core import kernels as F
from ..core.combine import Combination, grads_of, set_grads
from ..core.perturbations import GradientNormAscent
from ..core.schedules import Trigger
from ..core.shell import FlatOptimizer
from ..core.validation import check_choice, check_nonnegative, check_real
from .catalog import register


class _PassGradients(Combination):
    """Keeps the clean gradient and every perturbed pass's (their tensors, not copies)."""

    uses_intermediate = True

    def start(self, opt, params):
        return params, grads_of(params), []

    def after_pass(self, state, params):
        state[2].append(grads_of(state[0]))

    def finish(self, opt, state, params, passes):
        params, g0, passes_ = state
        set_grads(params, self.descent(g0, *passes_))
        return None

    def descent(self, g0, g1, g2, g3) -> list:
        raise NotImplementedError


class FlatnessGradient(_PassGradients):
    """GAM's descent gradient: ``d = β₁·g₁ + β₃·g₃`` with the conflicting component of
    ``m = g₀ + |β₂|·g₂`` removed, ``d − γ·(m − (⟨m, d⟩/‖d‖²)·d)`` (the authors' gradient
    decomposition, ``γ = grad_gamma``)."""

    uses_clean = True

    def __init__(self, beta1: float, beta2: float, beta3: float, gamma: float):
        self.beta1, self.beta2, self.beta3, self.gamma = beta1, beta2, beta3, gamma

    def __repr__(self) -> str:
        return f"FlatnessGradient(beta1={self.beta1}, beta2={self.beta2}, beta3={self.beta3}, gamma={self.gamma})"

    def descent(self, g0, g1, g2, g3):
        d = list(fe.mul(g1, self.beta1))
        fe.add_(d, g3, alpha=self.beta3)
        m = fe.add(g0, g2, alpha=abs(self.beta2))
        fe.add_(d, F.reject(m, onto=d), alpha=-self.gamma)
        return d


class CFlatGradient(_PassGradients):
    """C-Flat's descent gradient: ``g₁ + λ·(g₃ − g₂)``, SAM's gradient plus λ times the gradient of the
    first-order flatness ``ρ·‖∇L‖`` around ``w + ε₂``."""

    def __init__(self, lamb: float):
        self.lamb = lamb

    def __repr__(self) -> str:
        return f"CFlatGradient(lamb={self.lamb})"

    def descent(self, g0, g1, g2, g3):
        flat = fe.sub(g3, g2)
        fe.mul_(flat, self.lamb)
        return list(fe.add(g1, flat))


class GradientNormThreshold(Trigger):
    """C-Flat+'s trigger: at step ``t`` (counted from 1), ``E = A/(1 + exp(−k·(t − t0))) − ‖g‖`` with
    ``g`` the clean gradient; perturb when ``E ≤ 0``, and ``A ← A − cof·E`` on every step taken."""

    def __init__(self, A: float, k: float, t0: float, cof: float):
        self.A, self.k, self.t0, self.cof = A, k, t0, cof

    def __repr__(self) -> str:
        return f"GradientNormThreshold(A={self.A}, k={self.k}, t0={self.t0}, cof={self.cof})"

    def before(self, step: int) -> Optional[bool]:
        return None

    def after(self, step, grad_sq_norm):
        norm = math.sqrt(float(grad_sq_norm()))  # the decision needs the value on the host: one sync
        z = -self.k * (step + 1 - self.t0)
        energy = (self.A / (1.0 + math.exp(z)) if z < 700 else 0.0) - norm
        new_a = self.A - self.cof * energy

        def commit():
            self.A = new_a

        return energy <= 0, commit

    def state_dict(self) -> dict:
        return {"A": self.A}

    def load_state_dict(self, state: dict) -> None:
        self.A = state["A"]


@register("gam")
class GAM(FlatOptimizer):
    """Gradient norm aware minimization (Zhang et al., CVPR 2023): first-order flatness, the authors'
    algorithm. From the points of :class:`~flatminima.core.perturbations.GradientNormAscent` with
    ``ρ = rho`` and the gradient-norm ascent radius ``ρ' = norm_rho``, descend along
    ``d − γ·(m − (⟨m, d⟩/‖d‖²)·d)`` with ``d = β₁·g₁ + β₃·g₃`` and ``m = g₀ + |β₂|·g₂``
    (``grad_beta_1..3``, ``γ = grad_gamma``). Axes: that perturbation and the combination
    :class:`FlatnessGradient`. ``norm_rho`` is held constant (the schedule scales ``rho``).
    Cost: 4 forward/backward passes.
    """

    def __init__(self, base, rho: float = 0.1, norm_rho: float = 0.02, grad_beta_1: float = 1.0,
                 grad_beta_2: float = -1.0, grad_beta_3: float = 1.0, grad_gamma: float = 0.3, **common):
        check_nonnegative("norm_rho", norm_rho)
        betas = [check_real(f"grad_beta_{i}", b) for i, b in enumerate((grad_beta_1, grad_beta_2, grad_beta_3), 1)]
        check_nonnegative("grad_gamma", grad_gamma)
        super().__init__(base, perturbation=GradientNormAscent(float(norm_rho)),
                         combination=FlatnessGradient(*betas, float(grad_gamma)), strength=rho, **common)


@register("cflat", "c-flat")
class CFlat(FlatOptimizer):
    """C-Flat (Bian et al., NeurIPS 2024), flatness for continual learning: from the points of
    :class:`~flatminima.core.perturbations.GradientNormAscent` (both radii ``rho``), descend along
    ``g₁ + λ·(g₃ − g₂)``, ``λ = lamb``: the zeroth-order sharpness (SAM's gradient) plus λ times the
    first-order flatness. ``strategy="plus"`` (C-Flat+) perturbs only when
    ``A/(1 + exp(−k·(t − t0))) ≤ ‖g‖`` (:class:`GradientNormThreshold`; ``A``, ``k``, ``t0``,
    ``cof``), the base step otherwise. Axes: that perturbation, the combination
    :class:`CFlatGradient` and, for "plus", the trigger. Cost: 4 forward/backward passes.
    """

    def __init__(self, base, rho: float = 0.1, lamb: float = 0.2, strategy: str = "basic", A: float = 5.0,
                 k: float = 0.01, t0: float = 80.0, cof: float = 1.0, **common):
        check_nonnegative("lamb", lamb)
        check_choice("strategy", strategy, ("basic", "plus"))
        values = [check_real(name, v) for name, v in (("A", A), ("k", k), ("t0", t0), ("cof", cof))]
        trigger = GradientNormThreshold(*values) if strategy == "plus" else None
        super().__init__(base, perturbation=GradientNormAscent(), combination=CFlatGradient(float(lamb)),
                         trigger=trigger, strength=rho, **common)
