"""Methods that change only which gradient drives the base step: GSAM and WSAM (the combination axis)."""

from __future__ import annotations

from ..core.combine import DecoupledSharpness, MixGradient, SurrogateGap
from ..core.perturbations import Adversarial
from ..core.shell import FlatOptimizer
from ..core.validation import check_bool, check_fraction
from .catalog import below_one, per_tensor, register


@register("gsam")
class GSAM(FlatOptimizer):
    """Surrogate gap guided SAM (Zhuang et al., ICLR 2022): ε as SAM's, ``ε = ρ·g/‖g‖``; descend along
    ``g_a − α·g⊥`` with ``g_a = ∇L(w + ε)`` and ``g⊥ = g − (⟨g, g_a⟩/‖g_a‖²)·g_a``, the clean
    gradient's component orthogonal to ``g_a``: it lowers the surrogate gap ``L(w + ε) − L(w)``
    without changing the perturbed loss to first order. Axes: the adversarial perturbation and the
    combination :class:`~flatminima.core.combine.SurrogateGap` (``α = 0`` is SAM). The paper scales
    ρ with the learning rate: ``schedule="lr"``. Cost: 2 forward/backward passes.
    """

    def __init__(self, base, rho: float = 0.05, alpha: float = 0.4, normalization: str = "global", **common):
        check_fraction("alpha", alpha)
        super().__init__(base, perturbation=Adversarial(per_tensor=per_tensor(normalization)),
                         combination=SurrogateGap(float(alpha)), strength=rho, **common)


@register("wsam")
class WSAM(FlatOptimizer):
    """Weighted SAM (Yue et al., KDD 2023): the sharpness ``L(w + ε) − L(w)`` as a regularizer of weight
    ``α = γ/(1 − γ)``, ε as SAM's. ``decouple=True`` (the reference's default): the base optimizer
    steps on the clean gradient ``g``, then ``w ← w − lr·α·(g_a − g)`` outside it (its momentum and
    adaptive scaling never see the sharpness term); ``decouple=False``: descend along
    ``g + α·(g_a − g)``. Axes: the adversarial perturbation and the combination
    :class:`~flatminima.core.combine.DecoupledSharpness` (a weight update after the base step) or
    :class:`~flatminima.core.combine.MixGradient` with weight α. ``γ = 0`` is the base optimizer,
    ``γ = ½`` (coupled) is SAM. Cost: 2 forward/backward passes.
    """

    def __init__(self, base, rho: float = 0.05, gamma: float = 0.9, decouple: bool = True,
                 normalization: str = "global", **common):
        below_one("gamma", gamma)
        check_bool("decouple", decouple)
        alpha = float(gamma) / (1.0 - float(gamma))
        combination = DecoupledSharpness(alpha) if decouple else MixGradient(alpha)
        super().__init__(base, perturbation=Adversarial(per_tensor=per_tensor(normalization)),
                         combination=combination, strength=rho, **common)
