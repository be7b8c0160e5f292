"""Random weight perturbation: RWP, m-RWP (also parallel over ranks) and LPF-SGD."""

from __future__ import annotations

from typing import Union

import torch

from ..core.combine import MeanGradient, MixGradient
from ..core.perturbations import RandomNoise, RankSplit
from ..core.plan import closure_accepts
from ..core.scale import Scale
from ..core.schedules import Cosine
from ..core.shell import FlatOptimizer
from ..core.validation import check, check_bool, check_choice, check_fraction, check_int, check_nonnegative
from .catalog import below_one, register


#: The noise scales ``S`` of random weight perturbation, as scales of the weights.
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
    below_one("fisher_decay", fisher_decay)
    return RandomNoise(NOISE_SCALES[noise], float(fisher_eta), float(fisher_decay), **options)


@register("rwp")
class RWP(FlatOptimizer):
    """Random weight perturbation (Bayes objective ``E_ε L(w + ε)``; Li et al., 2024).

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
    """Mixed random weight perturbation (Li et al., 2024, eq. 8):
    descend along ``λ·∇L(w + ε) + (1 − λ)·∇L(w)``, ``λ = noisy_weight`` (eq. 8 and Algorithm 2 put
    λ on different terms; here it always weighs the noisy gradient), ε as in :class:`RWP`.
    ``different_batches=True``: the noisy gradient on batch ``B1`` and the clean one on ``B2``
    (Li et al., 2024, Table A1): ``step(closure, batches=[B1, B2])``, or two groups of micro-batches in
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
