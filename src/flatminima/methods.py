"""The named methods: each is a short composition of the axes of DESIGN.md §2, and the registry.

Every constructor has the shape ``Method(base_optimizer, **hyperparameters)`` and accepts the
common keyword arguments of :class:`~flatminima.optim.FlatOptimizer`: ``schedule`` (strength
schedule: ``"constant"``, ``"linear"``, ``"cosine"``, ``"lr"`` or a callable of the step),
``total_steps``, ``scope`` (an iterable of parameters, a module or a predicate), ``seed``,
``sync_perturbation`` and, for gradient-based methods, ``ascent_weight_decay``.
"""

from __future__ import annotations

import inspect
import math
from fractions import Fraction
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from .optim import (Adversarial, FlatOptimizer, LookSAMGradient, MeanGradient, MixGradient, RandomNoise, RandomSearch,
                    RankSplit, closure_accepts, tensor_predicate)
from . import _functional as F
from .validation import (check, check_bool, check_choice, check_fraction, check_int, check_nonnegative, check_norm,
                         check_positive, check_range, check_real, is_real)
from .registry import Registry
from .scale import GRANULARITIES, KINDS, Scale
from .schedules import AdaptiveThreshold, Cosine, Every, Probability, StartAt, step_generator

METHODS: Registry[type] = Registry("method name")


def register(name: str, *aliases: str):
    """Class decorator adding a method to the registry under ``name`` (and ``aliases``)."""

    def deco(cls):
        cls.method_name = name
        return METHODS.register(name, *aliases)(cls)

    return deco


def available() -> list[str]:
    """Names accepted by :func:`create`."""
    return METHODS.names()


def get(name: str) -> type:
    """The method class registered under ``name`` (case, ``-`` and ``_`` ignored)."""
    return METHODS.get(name)


def hyperparameters(name: str) -> list[str]:
    """Keyword arguments method ``name`` accepts (its own and the common ones)."""
    cls = get(name)
    names = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "base", "common")]
    return names + [c for c in COMMON if c not in names]


def needs_model(name: str) -> bool:
    """Whether method ``name`` takes the model (Flat-LoRA, SAM-LoRA: the PEFT model whose LoRA layers
    it perturbs)."""
    return "model" in hyperparameters(name)


def create(name: str, base: torch.optim.Optimizer, **hyperparams: Any) -> FlatOptimizer:
    """``create("sam", torch.optim.SGD(...), rho=0.1)``: build a method by name."""
    cls = get(name)
    accepted = hyperparameters(name)
    for k in hyperparams:
        check(f"hyperparameter {k!r} for {name}", k in accepted, k, f"one of {', '.join(accepted)}")
    return cls(base, **hyperparams)


COMMON = ("schedule", "total_steps", "scope", "seed", "sync_perturbation", "ascent_weight_decay")


def _per_tensor(normalization: str) -> bool:
    return check_choice("normalization", normalization, ("global", "per_tensor")) == "per_tensor"


def _below_one(name: str, value: Any) -> float:
    """A decay or sparsity: a number in ``[0, 1)``."""
    return check_range(name, value, 0.0, 1.0, high_open=True)


@register("base", "none", "sgd")
class Base(FlatOptimizer):
    """The base optimizer alone, through the same shell (the reference the methods reduce to)."""

    def __init__(self, base, **common):
        super().__init__(base, **common)


@register("sam")
class SAM(FlatOptimizer):
    """Sharpness-aware minimization (Foret et al., ICLR 2021).

    ``ε = ρ·sign(g)|g|^{q−1}/‖g‖_q^{q−1}`` (``1/p + 1/q = 1``): ``ρ·g/‖g‖₂`` for ``norm=2``,
    ``ρ·sign(g)`` for ``norm="inf"``; descend along ``∇L(w + ε)`` from ``w``.
    ``normalization="per_tensor"`` normalizes each tensor on its own (SAM-LoRA's separate A/B).
    ``different_batches=True``: ε from the gradient of batch ``B1``, the descent gradient at
    ``w + ε`` on ``B2`` (seed 004, Table A1): ``step(closure, batches=[B1, B2])``, or two groups of
    micro-batches in ``TrainStep``. Cost: 2 forward/backward passes per step.
    """

    def __init__(self, base, rho: float = 0.05, norm: Union[float, str] = 2, normalization: str = "global",
                 different_batches: bool = False, **common):
        p = check_norm("norm", norm)
        check_bool("different_batches", different_batches)
        super().__init__(base, perturbation=Adversarial(norm=p, per_tensor=_per_tensor(normalization),
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
        super().__init__(base, perturbation=Adversarial(norm=p, scale=scale, per_tensor=_per_tensor(normalization)),
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


@register("gasam", "ga-sam")
class GASAM(FlatOptimizer):
    """Gradient-strength based adaptive SAM (Zhang et al., EMNLP 2022; seed 002).

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
                                   step_size=step_size, per_tensor=_per_tensor(normalization))
        super().__init__(base, perturbation=perturbation, combination=MeanGradient(),
                         trigger=StartAt(start_step), strength_key="epsilon", strength=epsilon, **common)


@register("multistepsam", "multi-step-sam")
class MultiStepSAM(GASAM):
    """Multi-step adversarial parameter defense (Zhang et al. 2021): GA-SAM with ``T = 1``."""

    def __init__(self, base, epsilon: float = 0.05, steps: int = 1, norm: Union[float, str] = 2,
                 step_size: float = 1.5, start_step: int = 0, normalization: str = "global", **common):
        super().__init__(base, epsilon=epsilon, steps=steps, norm=norm, scale="one", step_size=step_size,
                         start_step=start_step, normalization=normalization, **common)


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
        super().__init__(base, perturbation=Adversarial(norm=p, per_tensor=_per_tensor(normalization)),
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
        super().__init__(base, perturbation=Adversarial(norm=q, per_tensor=_per_tensor(normalization)),
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
        _below_one("decay", decay)
        check_real("c_start", c_start)
        check_real("c_end", c_end)
        q = check_norm("norm", norm)
        trigger = AdaptiveThreshold(decay, c_start, c_end, common.get("total_steps"))
        super().__init__(base, perturbation=Adversarial(norm=q, per_tensor=_per_tensor(normalization)),
                         trigger=trigger, strength=rho, **common)


def keep_count(sparsity: float, n: int) -> int:
    """``⌈(1 − s)·n⌉`` entries kept, from the decimal value of ``s`` (``s = 0.7``, ``n = 10`` keeps 3,
    not the 4 that the float ``(1 − 0.7)·10 = 3.0000000000000004`` would give); at least 1."""
    return max(1, math.ceil((1 - Fraction(repr(float(sparsity)))) * n))


def top_k_mask(scores: Tensor, k: int) -> Tensor:
    """Exactly ``k`` True entries at the largest ``scores``; ties at the k-th value go to the lowest
    indices (deterministic, unlike ``torch.topk``'s order), e.g. all-zero gradients of dead units."""
    kth = torch.topk(scores, k, sorted=False).values.min()
    above, tied = scores > kth, scores == kth
    return above | (tied & (tied.cumsum(0) <= k - above.sum()))


class SparseMask:
    """SSAM's sparse perturbation mask (Mi et al., NeurIPS 2022), ``sparsity`` = fraction left out.

    Exactly ``⌈(1 − sparsity)·n⌉`` of the ``n`` scoped entries are kept (:func:`keep_count`).
    ``mode="fisher"``: the top entries of the empirical Fisher ``g⊙g`` of the clean gradient over the
    whole scope (:func:`top_k_mask`), refreshed every ``interval`` steps. ``mode="random"``: a random
    mask; every ``interval`` steps a ``fraction`` of its entries is dropped at random and as many are
    grown at random among the others (dynamic sparse training), so the sparsity stays exact.

    ``normalize`` (:meth:`ascent`): ``"masked"`` gives ``ε = ρ·(m⊙g)/‖m⊙g‖``, the maximiser over the
    masked ball (‖ε‖ = ρ); ``"full"`` gives the official code's ``ε = ρ·(m⊙g)/‖g‖`` (‖ε‖ ≤ ρ).
    """

    def __init__(self, mode: str, sparsity: float, interval: int, fraction: float, seed: int,
                 normalize: str = "masked"):
        self.mode, self.sparsity, self.interval, self.fraction, self.seed = mode, sparsity, interval, fraction, seed
        self.normalize = normalize

    def __repr__(self) -> str:
        return (f"SparseMask({self.mode!r}, sparsity={self.sparsity}, interval={self.interval}, "
                f"normalize={self.normalize!r})")

    def __call__(self, opt: FlatOptimizer, params: list[Tensor], grads: list[Tensor]):
        masks = [opt.method_state[p].get("ssam_mask") for p in params]
        step = opt.step_count
        if all(m is not None for m in masks) and step % self.interval != 0:
            return masks, None
        sizes = [p.numel() for p in params]
        n = sum(sizes)
        keep = keep_count(self.sparsity, n)
        with torch.no_grad():
            if self.mode == "fisher":
                flat = top_k_mask(torch.cat([(g.detach().float() ** 2).flatten() for g in grads]), keep)
            else:
                flat = self._random(masks, sizes, n, keep, step, params[0].device)
        new = [m.view_as(p) for m, p in zip(torch.split(flat, sizes), params)]

        def commit():
            for p, m in zip(params, new):
                opt.method_state[p]["ssam_mask"] = m

        return new, commit

    def ascent(self, g: list[Tensor], masks: list[Tensor], scale, p: float, per_tensor: bool,
               factor: Optional[float]) -> list[Tensor]:
        """The masked ascent step ``factor·T ⊙ dual(T ⊙ (m⊙g))``; with ``normalize="full"`` (p = 2,
        T = 1) multiplied by ``‖m⊙g‖/‖g‖`` (per tensor with ``per_tensor``), i.e. ``ρ·(m⊙g)/‖g‖``."""
        gm = torch._foreach_mul(g, masks)
        u = F.ascent_direction(gm, scale, p, per_tensor, factor)
        if self.normalize == "full":
            kept = F._norms(gm, 2.0, per_tensor)
            ratios = [k / n.clamp_min(F.TINY) for k, n in zip(kept, F._norms(g, 2.0, per_tensor))]
            torch._foreach_mul_(u, F._cast(ratios, u))
        return u

    def _random(self, masks, sizes, n, keep, step, device) -> Tensor:
        gen = step_generator(self.seed, step, stream=2)
        if any(m is None for m in masks):
            flat = torch.zeros(n, dtype=torch.bool)
            flat[torch.randperm(n, generator=gen)[:keep]] = True
            return flat.to(device)
        flat = torch.cat([m.flatten().cpu() for m in masks])
        active, inactive = flat.nonzero().flatten(), (~flat).nonzero().flatten()
        swap = min(int(self.fraction * active.numel()), inactive.numel())
        drop = active[torch.randperm(active.numel(), generator=gen)[:swap]]
        grow = inactive[torch.randperm(inactive.numel(), generator=gen)[:swap]]
        flat[drop], flat[grow] = False, True
        return flat.to(device)


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
        _below_one("sparsity", sparsity)
        check_choice("mask", mask, ("fisher", "random"))
        check_int("interval", interval, 1)
        check_fraction("fraction", fraction)
        q = check_norm("norm", norm)
        check_choice("normalize", normalize, ("masked", "full"))
        check("norm", normalize == "masked" or q == 2.0, norm, "2 with normalize='full' (the official code's L2 form)")
        sparse = SparseMask(mask, float(sparsity), interval, float(fraction), common.get("seed", 0), normalize)
        super().__init__(base, perturbation=Adversarial(norm=q, per_tensor=_per_tensor(normalization), mask=sparse),
                         strength=rho, **common)


@register("randomsearchsam", "random-search-sam")
class RandomSearchSAM(FlatOptimizer):
    """Randomized SAM search: the worst of ``candidates`` random points on the ρ-sphere (and ``w``),
    by loss; descend along the gradient there. Needs no clean gradient.
    Cost: ``candidates + 1`` forward passes and one forward/backward per step.
    """

    def __init__(self, base, rho: float = 0.05, candidates: int = 4, normalization: str = "global", **common):
        check_int("candidates", candidates, 1)
        super().__init__(base, perturbation=RandomSearch(candidates, per_tensor=_per_tensor(normalization)),
                         strength=rho, **common)


#: The noise scales ``S`` of seed 000, as scales of the weights.
NOISE_SCALES = {
    "uniform": Scale("one"),
    "matrix": Scale("w", "layer"),
    "element": Scale("w", "element"),
    "filter": Scale("w", "filter"),
    "flatlora": Scale("w_over_sqrt_n", "filter"),
}


def _random_noise(noise: str, fisher_eta: float, fisher_decay: float, **options) -> RandomNoise:
    check_choice("noise", noise, tuple(NOISE_SCALES))
    check_nonnegative("fisher_eta", fisher_eta)
    _below_one("fisher_decay", fisher_decay)
    return RandomNoise(NOISE_SCALES[noise], float(fisher_eta), float(fisher_decay), **options)


@register("rwp")
class RWP(FlatOptimizer):
    """Random weight perturbation (Bayes objective ``E_ε L(w + ε)``; Li et al., 2024; seeds 000, 004).

    ``ε = σ·Z ⊙ S`` with ``noise`` the scale ``S``: ``"uniform"`` (1), ``"matrix"`` (``‖W‖_F``),
    ``"element"`` (``|W_ij|``), ``"filter"`` (``‖W_{i,:}‖₂``, an output row / channel; 1-D tensors use
    their own norm), ``"flatlora"`` (``‖W_{i,:}‖₂/√n_in``); Fisher-damped ``S/√(1 + η·F)`` with
    ``fisher_eta = η > 0``. Descend along ``∇L(w + ε)`` (no clean pass). Cost: 1 fb.
    """

    def __init__(self, base, sigma: float = 0.015, noise: str = "filter", fisher_eta: float = 0.0,
                 fisher_decay: float = 0.99, **common):
        super().__init__(base, perturbation=_random_noise(noise, fisher_eta, fisher_decay),
                         strength_key="sigma", strength=sigma, **common)


@register("mrwp", "m-rwp")
class MRWP(FlatOptimizer):
    """Mixed random weight perturbation (Li et al., 2024; seed 004, eq. 8):
    descend along ``λ·∇L(w + ε) + (1 − λ)·∇L(w)``, ``λ = noisy_weight`` (eq. 8 and Algorithm 2 put
    λ on different terms; here it always weighs the noisy gradient), ε as in :class:`RWP`.
    ``different_batches=True``: the noisy gradient on batch ``B1`` and the clean one on ``B2``
    (seed 004, Table A1): ``step(closure, batches=[B1, B2])``, or two groups of micro-batches in
    ``TrainStep``. Cost: 2 fb.

    ``parallel=True`` (DDP, world size ``W ≥ 2``, any ``W``): the ranks split into ``k`` noisy and
    ``m = W − k`` clean ones, and each runs ONE synced forward/backward per step: a noisy rank at
    ``w + ε_r`` (ε seeded by (seed, step, rank, tensor), weights restored exactly afterwards), a
    clean rank at ``w``, its loss multiplied by ``λ·W/k`` or ``(1 − λ)·W/m`` before the backward, so
    the one all-reduce of the step gives ``λ·mean_noisy ∇L_r(w + ε_r) + (1 − λ)·mean_clean ∇L_r(w)``
    (each rank on its own shard) at plain-SGD cost. The *last* ``k = noisy_ranks`` ranks are noisy
    (rank 0 stays clean: its BatchNorm buffers are the ones DDP broadcasts); ``noisy_ranks=None``
    takes ``k = λ·W`` rounded half up, clamped to ``[1, W − 1]``. The default process group must be
    initialized at the first step (checked, with ``noisy_ranks ≤ W − 1``, before anything moves).
    Under gradient accumulation every rank's pass runs over all N micro-batches (loss / N), syncing
    on the last. The step's loss is the rank's own, unweighted (at ``w + ε_r`` on noisy ranks). Run
    it with :class:`~flatminima.engine.TrainStep`, or ``step(closure)`` with a closure taking
    ``loss_weight`` (``(loss * loss_weight).backward()``); the explicit form is refused.
    """

    def __init__(self, base, sigma: float = 0.015, noisy_weight: float = 0.5, noise: str = "filter",
                 different_batches: bool = False, fisher_eta: float = 0.0, fisher_decay: float = 0.99,
                 parallel: bool = False, noisy_ranks: Union[int, None] = None, **common):
        check_fraction("noisy_weight", noisy_weight)
        check_bool("different_batches", different_batches)
        check_bool("parallel", parallel)
        check("parallel", not (parallel and different_batches), parallel,
              "False with different_batches=True (in parallel each rank has its own batch)")
        if noisy_ranks is not None:
            check("noisy_ranks", parallel, noisy_ranks, "None unless parallel=True")
            check_int("noisy_ranks", noisy_ranks, 1)
        batches = {"noisy_batch": (0, 2), "clean_batch": (1, 2)} if different_batches else {}
        noise_ = _random_noise(noise, fisher_eta, fisher_decay, **batches)
        if parallel:
            split = RankSplit(noise_, float(noisy_weight), noisy_ranks)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                split.split()  # fail early when the group is already there
            kwargs = {"perturbation": split}
        else:
            kwargs = {"perturbation": noise_, "combination": MixGradient(float(noisy_weight))}
        super().__init__(base, strength_key="sigma", strength=sigma, **kwargs, **common)
        self.parallel = parallel

    def _refuse_explicit(self) -> None:
        if self.parallel:
            raise RuntimeError("MRWP(parallel=True) weighs each rank's loss before its backward pass: use "
                               "flatminima.TrainStep, or step(closure) with a closure(loss_weight=1.0) that calls "
                               "(loss * loss_weight).backward(); the explicit form is not supported")

    def perturbed(self, forward=None, scaler=None):
        self._refuse_explicit()
        return super().perturbed(forward, scaler)

    def perturbations(self, forward=None, scaler=None):
        self._refuse_explicit()
        return super().perturbations(forward, scaler)

    def step(self, closure=None, batches=None):
        if self.parallel and (closure is None and self._plan_gen is None
                              or closure is not None and not closure_accepts(closure, "loss_weight")):
            self._refuse_explicit()
        return super().step(closure, batches)


@register("lpfsgd", "lpf-sgd")
class LPFSGD(FlatOptimizer):
    """Low-pass filter SGD (Bisla et al., AISTATS 2022): descend along the mean of
    ``∇L_{B_m}(w + ε_m)`` over ``samples = M`` independent draws ``ε_m = σ_t·Z_m ⊙ S`` (filter
    scale by default), each on its own chunk ``B_m`` of the batch: ``step(closure, batches=chunks)``
    or M groups of micro-batches in ``TrainStep`` (without chunks every draw sees the whole batch).
    ``σ_t = σ·(α/2·(1 − cos(πt/T)) + 1)`` increases over ``total_steps = T`` (constant without T).
    Cost: M forward/backward passes on M chunks: about one pass over the batch.
    """

    def __init__(self, base, sigma: float = 0.0005, samples: int = 8, alpha: float = 1.0, noise: str = "filter",
                 fisher_eta: float = 0.0, fisher_decay: float = 0.99, **common):
        check_int("samples", samples, 1)
        check_nonnegative("alpha", alpha)
        if common.get("schedule") is None and common.get("total_steps") is not None:
            common["schedule"] = Cosine(common["total_steps"], 1.0, 1.0 + alpha)
        perturbation = _random_noise(noise, fisher_eta, fisher_decay, samples=samples, per_batch=True)
        super().__init__(base, perturbation=perturbation, combination=MeanGradient(include_clean=False),
                         strength_key="sigma", strength=sigma, **common)
