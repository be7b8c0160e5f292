"""SAM on some steps only: LookSAM, stochastic SAM and AE-SAM (the schedule and trigger axes)."""

from __future__ import annotations

from typing import Callable, Union

from ..core.combine import LookSAMGradient
from ..core.perturbations import Adversarial
from ..core.schedules import AdaptiveThreshold, Every, Probability
from ..core.shell import FlatOptimizer
from ..core.validation import check, check_int, check_nonnegative, check_norm, check_real, is_real
from .catalog import below_one, per_tensor, register


@register("looksam")
class LookSAM(FlatOptimizer):
    """LookSAM (Liu et al., CVPR 2022): a SAM step every ``k`` steps; in between, reuse the stored
    SAM direction ``g_v``: descend along ``g + α·(‖g‖/‖g_v‖)·g_v``.
    Cost: ``1 + 1/k`` forward/backward passes per step on average.
    """

    def __init__(self, base, rho: float = 0.05, k: int = 5, alpha: float = 0.7, norm: Union[float, str] = 2,
                 normalization: str = "global", **common):
        check_int("k", k, 1)
        check_nonnegative("alpha", alpha)
        p = check_norm("norm", norm)
        super().__init__(base, perturbation=Adversarial(norm=p, per_tensor=per_tensor(normalization)),
                         combination=LookSAMGradient(alpha), trigger=Every(k), strength=rho, **common)


@register("stochasticsam", "ss-sam", "rst")
class StochasticSAM(FlatOptimizer):
    """SAM with probability ``p`` (or ``p(step)``), the base step otherwise (SS-SAM, Zhao et al.
    2022; RST, Zhou et al. 2022). Coins come from the method's own seeded generator.
    Cost: ``1 + p`` forward/backward passes per step on average.
    """

    def __init__(self, base, rho: float = 0.05, p: Union[float, Callable[[int], float]] = 0.5,
                 norm: Union[float, str] = 2, normalization: str = "global", **common):
        if not callable(p):
            check("p", is_real(p) and 0.0 <= p <= 1.0, p, "a number in [0, 1] or a callable of the step")
        q = check_norm("norm", norm)
        seed = common.get("seed", 0)
        super().__init__(base, perturbation=Adversarial(norm=q, per_tensor=per_tensor(normalization)),
                         trigger=Probability(p, seed=seed), strength=rho, **common)


@register("aesam", "ae-sam")
class AESAM(FlatOptimizer):
    """Adaptive policy SAM (Jiang et al., ICLR 2023): SAM only when ``‖g‖² ≥ μ_t + c_t·σ_t``,
    with EMA (``decay``) mean and variance of ``‖g‖²`` and ``c_t`` linear from ``c_start`` to
    ``c_end`` over ``total_steps`` (constant ``(c_start + c_end)/2`` without it).
    Cost: 1 to 2 forward/backward passes per step (about half the steps are SAM steps with the
    defaults; fewer as ``c_t`` grows).
    """

    def __init__(self, base, rho: float = 0.05, decay: float = 0.9, c_start: float = -1.0, c_end: float = 1.0,
                 norm: Union[float, str] = 2, normalization: str = "global", **common):
        below_one("decay", decay)
        check_real("c_start", c_start)
        check_real("c_end", c_end)
        q = check_norm("norm", norm)
        trigger = AdaptiveThreshold(decay, c_start, c_end, common.get("total_steps"))
        super().__init__(base, perturbation=Adversarial(norm=q, per_tensor=per_tensor(normalization)),
                         trigger=trigger, strength=rho, **common)
