"""SWAD: dense weight averaging inside a window found from the validation losses."""

from __future__ import annotations

import numbers
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.optim import swa_utils

from ..core.validation import check, check_bool, check_int, is_real
from .base import _Averager, _AvgFn, _check_device, _check_model, _merge_, _tensors


@dataclass
class _Evaluation:
    """One reported validation loss and the weights SWAD may need from it.

    ``mean``/``count``: running mean of the weights after steps ``(previous evaluation, step]``;
    ``snapshot``: the weights at ``step`` itself (only while ``step`` may still become ``t_s``).
    """

    step: int
    loss: float
    mean: Optional[list[Tensor]]
    count: int
    snapshot: Optional[list[Tensor]]


class SWAD(_Averager):
    """SWAD: dense weight averaging inside an overfit-aware window (Cha et al., NeurIPS 2021,
    "SWAD: Domain Generalization by Seeking Flat Minima").

    Every step's weights are averaged, but only those of the steps in ``[t_s, t_e]`` (both
    included) end up in the result. With ``E(i)`` the validation loss of the i-th reported
    evaluation (``report_validation``), in order:

    * ``t_s`` is the first evaluation with ``min_{i∈[0, N_s−1]} E(t_s + i) = E(t_s)``: the loss
      does not decrease below its value at ``t_s`` during the next ``N_s − 1`` evaluations;
    * ``t_e`` is the first evaluation after ``t_s`` with ``min_{i∈[0, N_e−1]} E(t_e + i) > r·E(t_s)``:
      the loss stays above the tolerance ``r·E(t_s)`` for ``N_e`` consecutive evaluations.

    The window is only known in hindsight (``t_s`` after ``N_s − 1`` more evaluations, ``t_e``
    after ``N_e − 1``), so, like the official implementation, SWAD keeps the running mean of each
    segment of steps between two evaluations and merges segments into the result once the rule
    has decided about them. ``t_s`` candidates also keep the weights at the evaluation step itself
    (the window starts exactly there). ``finished`` turns True when ``t_e`` is known; later steps
    are ignored.

    Memory: at most ``max(2·N_s + 1, N_e + 2)`` copies of the averaged tensors (the result, the
    current segment, and per pending evaluation a segment mean plus, for ``t_s`` candidates, a
    snapshot), on ``device`` (e.g. ``"cpu"`` to keep accelerator memory free). Defaults: 8.

    If training stops first (``finalize`` with ``t_e`` unknown), the rule is applied to the
    evaluations there are: ``t_e`` is the first evaluation from which every remaining one exceeds
    ``r·E(t_s)``, else the last evaluation. Steps after the last evaluation are never averaged
    (no loss vouches for them). Without ``t_s`` ``finalize`` raises.

    We implement the paper's rule; the official code (khanrc/swad, ``LossValley``) differs, and we
    do not copy it: its threshold is ``(1 + tolerance_ratio)·mean(E(t_s..t_s+N_s−1))`` rather
    than ``r·E(t_s)``; its window is shifted by one segment (the steps ``(t_s−1, t_e−1]`` between
    evaluations, each segment weighted equally whatever its length); and with ``N_e > N_s`` it
    back-fills segments before ``t_s`` whose loss is under the threshold.

    ``n_start`` = N_s (int ≥ 1), ``n_end`` = N_e (int ≥ 1), ``tolerance`` = r (float ≥ 1);
    defaults 3, 6 and 1.3, the official configuration (``n_converge``, ``n_tolerance``,
    ``1 + tolerance_ratio``). Validation losses must be finite and ≥ 0.
    """

    def __init__(self, model: nn.Module, n_start: int = 3, n_end: int = 6, tolerance: float = 1.3, *,
                 use_buffers: bool = False, device: Any = None):
        _check_model(model)
        check_int("n_start", n_start, 1)
        check_int("n_end", n_end, 1)
        check("tolerance", is_real(tolerance) and tolerance >= 1, tolerance, "a finite float r >= 1")
        check_bool("use_buffers", use_buffers)
        _check_device(device)
        self.n_start, self.n_end, self.tolerance = n_start, n_end, float(tolerance)
        super().__init__(model, swa_utils.get_swa_multi_avg_fn(), use_buffers, device)
        # Running mean of the steps since the last evaluation; reset by zeroing n_averaged, which
        # makes AveragedModel copy on the next update instead of reallocating.
        self._segment_fn = _AvgFn(swa_utils.get_swa_multi_avg_fn())
        self._segment = swa_utils.AveragedModel(model, device=device, multi_avg_fn=self._segment_fn,
                                                use_buffers=use_buffers)
        self._segment_count = 0
        self._pending: deque[_Evaluation] = deque()
        self.phase = "search"  # search (for t_s) -> collect (until t_e) -> done
        self.t_s: Optional[int] = None
        self.t_e: Optional[int] = None
        self.threshold: Optional[float] = None
        self._last_committed: Optional[int] = None
        self._last_eval: Optional[int] = None

    @property
    def finished(self) -> bool:
        return self.phase == "done"

    @property
    def window(self) -> tuple[Optional[int], Optional[int]]:
        """``(t_s, t_e)`` as steps; None while unknown."""
        return self.t_s, self.t_e

    def _counts(self, step: int) -> bool:
        return self.phase != "done"

    def _accumulate(self) -> None:
        self._segment_fn.count = self._segment_count
        self._segment.update_parameters(self.model)
        self._segment_count += 1

    def report_validation(self, step: int, loss: Union[float, Tensor]) -> None:
        """Report the validation loss of the weights after ``step`` (call ``update(step)`` first)."""
        if self.finalized:
            raise RuntimeError("SWAD.finalize() was called: averaging has ended")
        if isinstance(loss, Tensor):
            check("loss", loss.numel() == 1, tuple(loss.shape), "a scalar")
            loss = loss.item()
        elif isinstance(loss, numbers.Real) and not isinstance(loss, bool):
            loss = float(loss)  # numpy scalars
        check("loss", is_real(loss) and loss >= 0, loss, "a finite float >= 0")
        check("step", step == self.last_step and step != self._last_eval, step,
              f"the step of the last update() ({self.last_step}), reported once")
        self._last_eval = step
        if self.phase == "done":
            return
        searching = self.phase == "search"
        # The segment before the oldest candidate is never in a window: do not copy it.
        keep_mean = not (searching and not self._pending)
        mean = [t.clone() for t in _tensors(self._segment.module, self.use_buffers)] if keep_mean else None
        snapshot = None
        if searching:
            snapshot = self._copy_like(_tensors(self.model, self.use_buffers))
        self._pending.append(_Evaluation(step, float(loss), mean, self._segment_count, snapshot))
        self._segment.n_averaged.zero_()
        self._segment_count = 0
        if searching:
            self._search_start()
        else:
            self._search_end()

    def _search_start(self) -> None:
        if len(self._pending) < self.n_start:
            return
        first = self._pending[0]
        if first.loss > min(e.loss for e in self._pending):
            self._pending.popleft()
            self._pending[0].mean = None  # now the oldest candidate: its earlier steps are outside any window
            return
        self.t_s, self.threshold = first.step, self.tolerance * first.loss
        self._commit(first.step, first.snapshot, 1)
        self._pending.popleft()
        for e in self._pending:
            e.snapshot = None
        self.phase = "collect"
        self._search_end()

    def _search_end(self, final: bool = False) -> None:
        """Merge each pending evaluation into the result once the end rule has decided about it;
        ``final``: training stopped, decide with the evaluations there are."""
        while self._pending and (final or len(self._pending) >= self.n_end):
            ahead = list(self._pending)[: self.n_end]
            ended = all(e.loss > self.threshold for e in ahead)
            e = self._pending.popleft()
            self._commit(e.step, e.mean, e.count)
            if ended:
                self._end(e.step)
                return
        if final:
            self._end(self._last_committed)

    def _end(self, step: int) -> None:
        self.t_e = step
        self.phase = "done"
        self._pending.clear()

    def _copy_like(self, tensors: list[Tensor]) -> list[Tensor]:
        """Copies of ``tensors`` on the devices (and dtypes) of the averaged tensors."""
        home = _tensors(self.averaged.module, self.use_buffers)
        return [t.detach().to(device=h.device, dtype=h.dtype, copy=True) for t, h in zip(tensors, home)]

    def _commit(self, step: int, tensors: Optional[list[Tensor]], count: int) -> None:
        _merge_(_tensors(self.averaged.module, self.use_buffers), self._count, tensors, count)
        self._count += count
        self._last_committed = step
        self.averaged.n_averaged.fill_(self._count)

    def _prepare_final(self) -> None:
        if self.phase == "search":
            raise RuntimeError(
                f"SWAD found no window start t_s: {len(self._pending)} evaluation(s) pending and the rule needs "
                f"n_start={self.n_start} evaluations with no lower loss after the first; report more "
                "evaluations or lower n_start")
        if self.phase == "collect":
            self._search_end(final=True)
        if not self.use_buffers:
            with torch.no_grad():
                for b_avg, b in zip(self.module.buffers(), self.model.buffers()):
                    b_avg.copy_(b.detach())

    def _extra_state(self) -> dict:
        return {
            "segment": self._segment.state_dict(), "segment_count": self._segment_count, "phase": self.phase,
            "t_s": self.t_s, "t_e": self.t_e, "threshold": self.threshold,
            "last_committed": self._last_committed, "last_eval": self._last_eval,
            "pending": [vars(e).copy() for e in self._pending],
        }

    def _load_extra_state(self, state: dict) -> None:
        self._segment.load_state_dict(state["segment"])
        self._segment_count = int(state["segment_count"])
        self.phase, self.t_s, self.t_e, self.threshold = state["phase"], state["t_s"], state["t_e"], state["threshold"]
        self._last_committed = state["last_committed"]
        self._last_eval = state["last_eval"]

        def copy(ts: Optional[list[Tensor]]) -> Optional[list[Tensor]]:
            return None if ts is None else self._copy_like(ts)

        self._pending = deque(_Evaluation(e["step"], float(e["loss"]), copy(e["mean"]), int(e["count"]),
                                          copy(e["snapshot"])) for e in state["pending"])

    def __repr__(self) -> str:
        return (f"SWAD(n_start={self.n_start}, n_end={self.n_end}, tolerance={self.tolerance}, phase={self.phase!r}, "
                f"window={self.window}, n_averaged={self.n_averaged})")
