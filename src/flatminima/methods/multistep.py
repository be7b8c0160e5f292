"""Multi-step adversarial ascent: GA-SAM and the multi-step defense (K projected ascent steps)."""

from __future__ import annotations

import math
from typing import Union

from ..core.combine import MeanGradient
from ..core.perturbations import Adversarial
from ..core.scale import GRANULARITIES, KINDS, Scale
from ..core.schedules import StartAt
from ..core.validation import check, check_choice, check_int, check_norm, check_positive
from ..core.shell import FlatOptimizer
from .catalog import per_tensor, register


@register("gasam", "ga-sam")
class GASAM(FlatOptimizer):
    """Gradient-strength based adaptive SAM (Zhang et al., EMNLP 2022).

    ``T_i = √n_i/(‖g_i‖√n)`` at ``granularity`` (model / layer / filter / element), from the clean
    gradient. ``K = steps`` projected ascent steps ``a_k = Π(a_{k−1} + u_k)``,
    ``u_k = η·T ⊙ dual(T ⊙ g_{k−1})``, ``η = step_size·ε/K`` (1.5ε/K), ``Π`` onto
    ``‖T⁻¹a‖_p ≤ ε`` (``norm`` 2 or ``"inf"``); descend along the mean of ``∇L(w + a_k)``,
    ``k = 0..K``. ``scale`` picks the Table 2 variants of ``T`` (``"one"``, ``"w_over_g"``,
    ``"inv_g"``, ``"w_over_sqrt_n"``, ``"w"``). Before ``start_step`` it is the base optimizer.
    Cost: ``K + 1`` forward/backward passes.

    The budget is first-order (``a = ε·T²g`` raises the linearized loss by ε), and a group's
    Euclidean radius is ``ε·n_i/(n·‖g_i‖)``. On fresh LoRA factors (B = 0, A's gradient ∝ B) that
    is several times the factors' own norm, and the bilinear ``ε_B·ε_A`` term the budget ignores
    stalls training at layer granularity (K = 2 worst): use ``granularity="model"`` there
    (docs/results.md §2).
    """

    def __init__(self, base, epsilon: float = 0.01, steps: int = 1, norm: Union[float, str] = 2,
                 granularity: str = "layer", scale: str = "gradient_strength", step_size: float = 1.5,
                 start_step: int = 0, normalization: str = "global", **common):
        check_int("steps", steps, 1)
        p = check_norm("norm", norm)
        check("norm", p in (2.0, math.inf), norm, "2 or 'inf' (the projections GA-SAM defines)")
        check_choice("granularity", granularity, GRANULARITIES)
        check_choice("scale", scale, KINDS)
        check_positive("step_size", step_size)
        check_int("start_step", start_step, 0)
        perturbation = Adversarial(norm=p, scale=Scale(scale, granularity), steps=steps, project=True,
                                   step_size=step_size, per_tensor=per_tensor(normalization))
        super().__init__(base, perturbation=perturbation, combination=MeanGradient(),
                         trigger=StartAt(start_step), strength_key="epsilon", strength=epsilon, **common)


@register("multistepsam", "multi-step-sam")
class MultiStepSAM(GASAM):
    """Multi-step adversarial parameter defense (Zhang et al. 2021): GA-SAM with ``T = 1``."""

    def __init__(self, base, epsilon: float = 0.05, steps: int = 1, norm: Union[float, str] = 2,
                 step_size: float = 1.5, start_step: int = 0, normalization: str = "global", **common):
        super().__init__(base, epsilon=epsilon, steps=steps, norm=norm, scale="one", step_size=step_size,
                         start_step=start_step, normalization=normalization, **common)
