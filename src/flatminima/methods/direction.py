"""Methods that change the ascent direction: SSAM (a sparse mask), VaSSO (an EMA of gradients) and
FriendlySAM (the gradient minus its EMA)."""

from __future__ import annotations

from typing import Union

from ..core.ascent import GradientEMA, SparseMask, SubtractEMA
from ..core.perturbations import Adversarial
from ..core.shell import FlatOptimizer
from ..core.validation import check, check_choice, check_fraction, check_int, check_nonnegative, check_norm, check_range
from .catalog import below_one, per_tensor, register


@register("ssam")
class SSAM(FlatOptimizer):
    """Sparse SAM (Mi et al., NeurIPS 2022): SAM with ε restricted to a sparse mask ``m``,
    ``ε = ρ·(m⊙g)/‖m⊙g‖`` (``normalize="masked"``, the exact maximiser over the masked ball) or the
    official code's ``ε = ρ·(m⊙g)/‖g‖`` (``normalize="full"``, L2 only); see :class:`SparseMask` for
    ``mask``, ``interval`` and ``fraction``.
    Cost: 2 forward/backward passes (the sparse ε is what a sparse-aware backend can exploit).
    """

    def __init__(self, base, rho: float = 0.05, sparsity: float = 0.5, mask: str = "fisher", interval: int = 10,
                 fraction: float = 0.5, norm: Union[float, str] = 2, normalization: str = "global",
                 normalize: str = "masked", **common):
        below_one("sparsity", sparsity)
        check_choice("mask", mask, ("fisher", "random"))
        check_int("interval", interval, 1)
        check_fraction("fraction", fraction)
        q = check_norm("norm", norm)
        check_choice("normalize", normalize, ("masked", "full"))
        check("norm", normalize == "masked" or q == 2.0, norm, "2 with normalize='full' (the official code's L2 form)")
        sparse = SparseMask(mask, float(sparsity), interval, float(fraction), common.get("seed", 0), normalize)
        super().__init__(base, perturbation=Adversarial(norm=q, per_tensor=per_tensor(normalization)),
                         ascent=[sparse], strength=rho, **common)


@register("vasso")
class VaSSO(FlatOptimizer):
    """Variance-suppressed sharpness-aware optimization (Li & Giannakis, NeurIPS 2023): ε along an
    EMA of the gradients, ``d_t = (1 − θ)·d_{t−1} + θ·g_t`` (``d_0 = g_0``), ``ε = ρ·d_t/‖d_t‖``;
    descend along ``∇L(w + ε)``. Axes: the adversarial perturbation with the ascent direction
    :class:`~flatminima.core.ascent.GradientEMA` (``θ = 1`` is SAM). The EMA moves only on steps
    that are taken. Cost: 2 forward/backward passes, and one gradient-sized EMA.
    """

    def __init__(self, base, rho: float = 0.05, theta: float = 0.9, normalization: str = "global", **common):
        check_range("theta", theta, 0.0, 1.0, low_open=True)
        super().__init__(base, perturbation=Adversarial(per_tensor=per_tensor(normalization)),
                         ascent=[GradientEMA(float(theta))], strength=rho, **common)


@register("friendlysam", "fsam")
class FriendlySAM(FlatOptimizer):
    """Friendly SAM (Li et al., CVPR 2024): the adversary follows the batch-specific part of the
    gradient, ``d_t = g_t − σ·m_{t−1}`` with the EMA ``m_t = λ·m_{t−1} + (1 − λ)·g_t`` (``m_0 = g_0``;
    the first step follows ``g_0``), ``ε = ρ·d_t/‖d_t‖``; descend along ``∇L(w + ε)``. Axes: the
    adversarial perturbation with the ascent direction :class:`~flatminima.core.ascent.SubtractEMA`
    (``σ = 0`` is SAM). Cost: 2 forward/backward passes, and one gradient-sized EMA.
    """

    def __init__(self, base, rho: float = 0.05, sigma: float = 1.0, lmbda: float = 0.9,
                 normalization: str = "global", **common):
        check_nonnegative("sigma", sigma)
        below_one("lmbda", lmbda)
        super().__init__(base, perturbation=Adversarial(per_tensor=per_tensor(normalization)),
                         ascent=[SubtractEMA(float(sigma), float(lmbda))], strength=rho, **common)
