"""SWA: the equal-weight mean of the weights after the counted steps."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import swa_utils

from ..core.validation import check_bool, check_int
from .base import _Averager, _check_device, _check_model, _schedule_counts


class SWA(_Averager):
    """Stochastic weight averaging (Izmailov et al., UAI 2018, "Averaging Weights Leads to Wider
    Optima and Better Generalization").

    ``w_SWA = (1/K)·Σ_{k=1..K} w_{t_k}``, ``t_k = start + (k−1)·every``: the equal-weight mean of
    the weights after the counted steps, kept as a running mean
    ``w̄ ← w̄ + (w − w̄)/(n + 1)`` (``get_swa_multi_avg_fn``; ``every`` = the cycle length ``c``
    with a cyclic learning rate, 1 with a constant one). BatchNorm statistics are recomputed for
    ``w_SWA`` by ``finalize(loader)``.

    ``start``: first step averaged (int ≥ 0); ``every``: average every that many steps (int ≥ 1);
    ``use_buffers``: average floating buffers too (default False: recompute BatchNorm instead);
    ``device``: where the average lives (default: the model's).
    """

    def __init__(self, model: nn.Module, start: int = 0, every: int = 1, *, use_buffers: bool = False,
                 device: Any = None):
        _check_model(model)
        check_int("start", start, 0)
        check_int("every", every, 1)
        check_bool("use_buffers", use_buffers)
        _check_device(device)
        self.start, self.every = start, every
        super().__init__(model, swa_utils.get_swa_multi_avg_fn(), use_buffers, device)

    def _counts(self, step: int) -> bool:
        return _schedule_counts(step, self.start, self.every)

    def __repr__(self) -> str:
        return f"SWA(start={self.start}, every={self.every}, n_averaged={self.n_averaged})"
