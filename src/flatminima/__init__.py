"""flatminima: training into flat minima (SAM family, random weight perturbation, diagnostics).

    import flatminima as fm
    opt = fm.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    loss = opt.step(closure)          # closure(): forward + backward, returns the loss

The package loads its API (and torch) on first use: ``import flatminima`` alone imports nothing
heavy, so the command line (``flatminima --help``, ``--version``) starts at once. The first
attribute read on the package (``fm.SAM``, ``from flatminima import SAM``, ``fm.lora``,
``dir(fm)``) imports the whole API, as an eager import would, with the registry complete
(``flatlora`` and ``samlora`` included). Importing a submodule (``import flatminima.core``) loads
that submodule and what it needs; ``flatlora`` and ``samlora`` join the method registry when
:mod:`flatminima.lora` is imported (any attribute read on the package does it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Where each public name lives: ``{module: names}``, imported in this order on first use.
_EXPORTS = {
    "core": ("schedules", "FlatOptimizer", "Pass", "params_by_name", "Scale"),
    "methods": ("AESAM", "ASAM", "GAM", "GASAM", "GSAM", "LPFSGD", "MRWP", "RWP", "SAM", "SSAM", "WSAM", "Base",
                "CFlat", "FisherSAM", "FriendlySAM", "LayerSAM", "LookSAM", "MultiStepSAM", "RandomSearchSAM",
                "StochasticSAM", "VaSSO", "available", "create", "get", "hyperparameters", "register", "unregister"),
    "engine": ("StepResult", "TrainStep", "train_step"),
    "diagnostics": (),
    "lora": ("FlatLoRA", "SAMLoRA"),
    "averaging": ("EMA", "SWA", "SWAD", "update_bn"),
    "trajectory": ("MESA", "SAF", "IndexedDataset", "trajectory_kl"),
    "lets": ("LETS",),
}

__all__ = [
    "EMA", "SWA", "SWAD", "update_bn", "MESA", "SAF", "IndexedDataset", "trajectory_kl", "LETS",
    "AESAM", "ASAM", "Base", "CFlat", "FisherSAM", "FriendlySAM", "GAM", "GSAM", "VaSSO", "WSAM", "FlatLoRA", "SAMLoRA",
    "diagnostics", "lora", "LPFSGD", "MRWP", "RWP", "params_by_name", "FlatOptimizer", "GASAM", "LayerSAM", "LookSAM",
    "MultiStepSAM", "Pass", "RandomSearchSAM", "SAM", "SSAM", "Scale", "StochasticSAM", "available", "create", "get",
    "hyperparameters", "register", "unregister", "schedules", "StepResult", "TrainStep", "train_step",
]

_state = {"loaded": False, "loading": False}


def _load() -> None:
    """Import every module of :data:`_EXPORTS` and bind its public names here (once)."""
    if _state["loaded"] or _state["loading"]:
        return
    _state["loading"] = True
    try:
        for module_name, names in _EXPORTS.items():
            module = importlib.import_module(f"{__name__}.{module_name}")
            globals()[module_name] = module
            for name in names:
                globals()[name] = getattr(module, name)
        _state["loaded"] = True
    finally:
        _state["loading"] = False


def __getattr__(name: str) -> Any:
    # Dunder probes (pickle, inspect, test collectors) do not load the API. While it loads, a
    # submodule's ``from .. import methods`` falls through to the import system (AttributeError).
    if not (name.startswith("__") and name.endswith("__")):
        _load()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    _load()
    return sorted(globals())


if TYPE_CHECKING:  # what type checkers and IDEs see: the names bound by _load()
    from . import diagnostics, lora
    from .averaging import EMA, SWA, SWAD, update_bn
    from .core import FlatOptimizer, Pass, Scale, params_by_name, schedules
    from .engine import StepResult, TrainStep, train_step
    from .lets import LETS
    from .lora import FlatLoRA, SAMLoRA
    from .methods import (AESAM, ASAM, GAM, GASAM, GSAM, LPFSGD, MRWP, RWP, SAM, SSAM, WSAM, Base, CFlat,
                          FisherSAM, FriendlySAM, LayerSAM, LookSAM, MultiStepSAM, RandomSearchSAM, StochasticSAM,
                          VaSSO, available, create, get, hyperparameters, register, unregister)
    from .trajectory import MESA, SAF, IndexedDataset, trajectory_kl
