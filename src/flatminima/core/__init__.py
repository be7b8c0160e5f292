"""The engine's core: the optimizer shell, the perturbation loop and the axes a method is made of.

Read it in this order: :mod:`~flatminima.core.validation` and :mod:`~flatminima.core.kernels`
(foreach tensor-list kernels; :mod:`~flatminima.core.reference` is the same written as loops),
:mod:`~flatminima.core.passes` and :mod:`~flatminima.core.plan` (a step as a generator of passes),
:mod:`~flatminima.core.perturb` (the one loop), then the axes: :mod:`~flatminima.core.scope`,
:mod:`~flatminima.core.ascent`, :mod:`~flatminima.core.perturbations` with
:mod:`~flatminima.core.scale`, :mod:`~flatminima.core.combine`, :mod:`~flatminima.core.schedules`;
and :mod:`~flatminima.core.shell`, the ``torch.optim.Optimizer`` that holds them. Nothing here
imports the methods, the LoRA layer, the engine or the integrations.
"""

from .ascent import (Ascent, AscentLink, AscentWeightDecay, Direction, GradientEMA, SparseMask, SubtractEMA,
                     keep_count, top_k_mask)
from .combine import (Combination, DecoupledSharpness, LookSAMGradient, MeanGradient, MixGradient, PerturbedGradient,
                      SurrogateGap, grads_of)
from .passes import Pass, Plan, Runner
from .perturb import NoPerturbation, Outcome, Perturbation, PerturbationContext, Point, perturb
from .perturbations import Adversarial, RandomNoise, RandomSearch, RankSplit, shard_like
from .plan import closure_accepts, closure_runner
from .registry import Registry
from .scale import Scale
from .scope import params_by_name, tensor_predicate
from .shell import Base, FlatOptimizer
from .state import StateSlot

__all__ = [
    "Adversarial", "Ascent", "AscentLink", "AscentWeightDecay", "Base", "Combination", "DecoupledSharpness",
    "Direction", "FlatOptimizer", "GradientEMA", "LookSAMGradient", "MeanGradient", "MixGradient", "NoPerturbation",
    "Outcome", "Pass", "Perturbation", "PerturbationContext", "PerturbedGradient", "Plan", "Point", "RandomNoise",
    "RandomSearch", "RankSplit", "Registry", "Runner", "Scale", "SparseMask", "StateSlot", "SubtractEMA",
    "SurrogateGap", "closure_accepts", "closure_runner", "grads_of", "keep_count", "params_by_name", "perturb",
    "shard_like", "tensor_predicate", "top_k_mask",
]
