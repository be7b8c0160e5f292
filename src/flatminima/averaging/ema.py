"""EMA: the exponential moving average of the weights, with an optional warm-up of the decay."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import swa_utils

from ..core.validation import check, check_bool, check_int, is_real
from .base import _Averager, _check_device, _check_model, _schedule_counts


class EMA(_Averager):
    """Exponential moving average of the weights (Polyak averaging with exponential weights; the
    warm-up is TensorFlow's ``ExponentialMovingAverage(num_updates=...)``).

    ``EMA_1 = w_{t_1}`` (the first counted step), then ``EMA_n = d_n·EMA_{n−1} + (1 − d_n)·w_{t_n}``
    (``get_ema_multi_avg_fn``, a foreach ``lerp``) with ``d_n = decay``, or with ``warmup=True``
    ``d_n = min(decay, (1 + m)/(10 + m))``, ``m = n − 1`` the number of earlier updates (so early,
    still-changing weights are forgotten fast). Counted steps: ``start, start + every, ...``.

    ``decay`` in [0, 1); ``use_buffers`` defaults to True (BatchNorm running statistics are
    averaged as well, the usual EMA practice; ``finalize(loader)`` can still recompute them).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, *, warmup: bool = False, start: int = 0,
                 every: int = 1, use_buffers: bool = True, device: Any = None):
        _check_model(model)
        check("decay", is_real(decay) and 0 <= decay < 1, decay, "a float in [0, 1)")
        check_bool("warmup", warmup)
        check_int("start", start, 0)
        check_int("every", every, 1)
        check_bool("use_buffers", use_buffers)
        _check_device(device)
        self.decay, self.warmup, self.start, self.every = float(decay), warmup, start, every
        super().__init__(model, swa_utils.get_ema_multi_avg_fn(self.decay), use_buffers, device)

    def current_decay(self) -> float:
        """The decay ``d_n`` the next update will use (``n − 1`` = the updates so far)."""
        m = self._count
        return min(self.decay, (1 + m) / (10 + m)) if self.warmup else self.decay

    def _counts(self, step: int) -> bool:
        return _schedule_counts(step, self.start, self.every)

    def _accumulate(self) -> None:
        if self.warmup:
            self._avg_fn.fn = swa_utils.get_ema_multi_avg_fn(self.current_decay())
        super()._accumulate()

    def __repr__(self) -> str:
        return f"EMA(decay={self.decay}, warmup={self.warmup}, n_averaged={self.n_averaged})"
