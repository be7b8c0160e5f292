"""flatminima: training into flat minima (SAM family, random weight perturbation, diagnostics).

    import flatminima as fm
    opt = fm.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    loss = opt.step(closure)          # closure(): forward + backward, returns the loss
"""

from .core import schedules
from .core import FlatOptimizer, Pass, params_by_name
from .methods import (AESAM, ASAM, GAM, GASAM, GSAM, LPFSGD, MRWP, RWP, SAM, SSAM, WSAM, Base, CFlat, FisherSAM,
                      FriendlySAM, LayerSAM, LookSAM, MultiStepSAM, RandomSearchSAM, StochasticSAM, VaSSO, available,
                      create, get, hyperparameters, register, unregister)
from .engine import StepResult, TrainStep, train_step
from . import diagnostics, lora
from .lora import FlatLoRA, SAMLoRA
from .core import Scale
from .averaging import EMA, SWA, SWAD, update_bn
from .trajectory import MESA, SAF, IndexedDataset, trajectory_kl
from .lets import LETS

__version__ = "0.1.0"

__all__ = [
    "EMA", "SWA", "SWAD", "update_bn", "MESA", "SAF", "IndexedDataset", "trajectory_kl", "LETS",
    "AESAM", "ASAM", "Base", "CFlat", "FisherSAM", "FriendlySAM", "GAM", "GSAM", "VaSSO", "WSAM", "FlatLoRA", "SAMLoRA", "diagnostics", "lora", "LPFSGD", "MRWP", "RWP", "params_by_name", "FlatOptimizer", "GASAM", "LayerSAM", "LookSAM", "MultiStepSAM", "Pass",
    "RandomSearchSAM", "SAM", "SSAM", "Scale", "StochasticSAM", "available", "create", "get", "hyperparameters",
    "register", "unregister", "schedules", "StepResult", "TrainStep", "train_step",
]
