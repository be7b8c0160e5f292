"""SAM and the methods that change only the perturbation's scale or search: ASAM, Layer-SAM,
Fisher-SAM, random-search SAM."""

from __future__ import annotations

from typing import Union

from ..core.perturbations import Adversarial, RandomSearch
from ..core.scale import Scale
from ..core.scope import tensor_predicate
from ..core.shell import FlatOptimizer
from ..core.validation import check_bool, check_choice, check_int, check_nonnegative, check_norm
from .catalog import per_tensor, register


@register("sam")
class SAM(FlatOptimizer):
    """Sharpness-aware minimization (Foret et al., ICLR 2021).

    ``ε = ρ·sign(g)|g|^{q−1}/‖g‖_q^{q−1}`` (``1/p + 1/q = 1``): ``ρ·g/‖g‖₂`` for ``norm=2``,
    ``ρ·sign(g)`` for ``norm="inf"``; descend along ``∇L(w + ε)`` from ``w``.
    ``normalization="per_tensor"`` normalizes each tensor on its own (SAM-LoRA's separate A/B).
    ``different_batches=True``: ε from the gradient of batch ``B1``, the descent gradient at
    ``w + ε`` on ``B2`` (Li et al., 2024, Table A1): ``step(closure, batches=[B1, B2])``, or two groups of
    micro-batches in ``TrainStep``. Cost: 2 forward/backward passes per step.
    """

    def __init__(self, base, rho: float = 0.05, norm: Union[float, str] = 2, normalization: str = "global",
                 different_batches: bool = False, **common):
        p = check_norm("norm", norm)
        check_bool("different_batches", different_batches)
        super().__init__(base, perturbation=Adversarial(norm=p, per_tensor=per_tensor(normalization),
                                                        different_batches=different_batches),
                         strength=rho, **common)


@register("asam")
class ASAM(FlatOptimizer):
    """Adaptive SAM (Kwon et al., ICML 2021): ``T = |w| + η``, ``ε = ρ·T²g/‖Tg‖₂``.

    ``granularity="filter"`` uses ``T = ‖w_{i,:}‖₂ + η`` per output row. By default the scale applies
    to every scoped tensor (the paper's definition). ``unscaled`` names tensors that get ``T = 1``
    instead (their ``ε = ρ·g/‖Tg‖₂``, still inside the one norm): a module, a predicate of a tensor
    or an iterable of parameters. The official code (SamsungLabs/ASAM) scales the parameters whose
    name contains ``weight`` and perturbs the others (biases) with ``T = 1``:
    ``unscaled=fm.params_by_name(model, exclude="weight")``. Typical ρ is 10× SAM's.
    Cost: 2 forward/backward passes.
    """

    def __init__(self, base, rho: float = 0.5, eta: float = 0.01, granularity: str = "element",
                 norm: Union[float, str] = 2, normalization: str = "global", unscaled=None, **common):
        check_choice("granularity", granularity, ("element", "filter"))
        p = check_norm("norm", norm)
        scale = Scale("w", granularity, eta, unit=tensor_predicate("unscaled", unscaled))
        super().__init__(base, perturbation=Adversarial(norm=p, scale=scale, per_tensor=per_tensor(normalization)),
                         strength=rho, **common)


@register("layersam", "layer-sam")
class LayerSAM(FlatOptimizer):
    """Layer-wise SAM (Liu et al., CVPR 2022): ``T_i = ‖w_i‖/‖g_i‖`` per tensor.

    ``ε = ρ·T²g/‖Tg‖₂``, the maximiser over ``‖T⁻¹ε‖₂ ≤ ρ`` (GA-SAM's unified form).
    Cost: 2 forward/backward passes.
    """

    def __init__(self, base, rho: float = 0.01, norm: Union[float, str] = 2, **common):
        p = check_norm("norm", norm)
        super().__init__(base, perturbation=Adversarial(norm=p, scale=Scale("w_over_g", "layer")), strength=rho, **common)


@register("randomsearchsam", "random-search-sam")
class RandomSearchSAM(FlatOptimizer):
    """Randomized SAM search: the worst of ``candidates`` random points on the ρ-sphere (and ``w``),
    by loss; descend along the gradient there. Needs no clean gradient.
    Cost: ``candidates + 1`` forward passes and one forward/backward per step.
    """

    def __init__(self, base, rho: float = 0.05, candidates: int = 4, normalization: str = "global", **common):
        check_int("candidates", candidates, 1)
        super().__init__(base, perturbation=RandomSearch(candidates, per_tensor=per_tensor(normalization)),
                         strength=rho, **common)


@register("fishersam", "fisher-sam")
class FisherSAM(FlatOptimizer):
    """Fisher SAM (Kim et al., ICML 2022): the ascent in the Fisher metric,
    ``ε = ρ·F⁻¹g/√(gᵀF⁻¹g)``, the maximiser of ``gᵀε`` over ``εᵀFε ≤ ρ²``, with the diagonal
    empirical Fisher ``F = 1 + η·g²`` of the clean gradient. Axes: the adversarial perturbation
    with the scale ``T = F^(−1/2)`` (:class:`~flatminima.core.scale.Scale` ``"fisher"``), since
    ``ρ·T²g/‖Tg‖₂`` is this ε; ``η = 0`` is SAM. Cost: 2 forward/backward passes.
    """

    def __init__(self, base, rho: float = 0.05, eta: float = 1.0, **common):
        check_nonnegative("eta", eta)
        super().__init__(base, perturbation=Adversarial(scale=Scale("fisher", "element", float(eta))),
                         strength=rho, **common)
