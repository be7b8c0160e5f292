"""The named methods, grouped by the axis they change, and the registry (:mod:`.catalog`).

Each method is a short composition of the core's axes (its docstring names them):

* :mod:`.sam`: SAM, ASAM, Layer-SAM, Fisher-SAM, random-search SAM (the scale, the search);
* :mod:`.multistep`: GA-SAM and the multi-step defense (K projected ascent steps);
* :mod:`.direction`: SSAM, VaSSO, FriendlySAM (the ascent direction);
* :mod:`.gradient`: GSAM, WSAM (the combination);
* :mod:`.schedule`: LookSAM, stochastic SAM, AE-SAM (when to perturb);
* :mod:`.flatness`: GAM, C-Flat (first-order flatness: three perturbed points);
* :mod:`.random`: RWP, m-RWP, LPF-SGD (random weight perturbation).
"""

from ..core.ascent import keep_count, top_k_mask
from ..core.shell import Base
from .catalog import COMMON, METHODS, available, create, get, hyperparameters, needs_model, register, unregister
from .direction import SSAM, FriendlySAM, VaSSO
from .flatness import GAM, CFlat
from .gradient import GSAM, WSAM
from .multistep import GASAM, MultiStepSAM
from .random import LPFSGD, MRWP, NOISE_SCALES, RWP
from .sam import ASAM, SAM, FisherSAM, LayerSAM, RandomSearchSAM
from .schedule import AESAM, LookSAM, StochasticSAM

__all__ = [
    "AESAM", "ASAM", "Base", "CFlat", "COMMON", "FisherSAM", "FriendlySAM", "GAM", "GASAM", "GSAM", "LPFSGD", "LayerSAM",
    "LookSAM", "METHODS", "MRWP", "MultiStepSAM", "NOISE_SCALES", "RWP", "RandomSearchSAM", "SAM", "SSAM",
    "StochasticSAM", "VaSSO", "WSAM", "available", "create", "get", "hyperparameters", "keep_count", "needs_model",
    "register", "top_k_mask", "unregister",
]
