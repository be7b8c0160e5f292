"""Weight averaging (DESIGN.md §3, "Beyond perturbation"): SWA, EMA and SWAD.

Each averager keeps a copy of the model in a ``torch.optim.swa_utils.AveragedModel`` and is fed
the weights the training loop holds after every optimizer step, so it works alone or on top of any
optimizer, flatminima's methods included (they restore ``w`` before the base optimizer steps, so
the averaged weights are never the perturbed ones)::

    avg = fm.SWA(model, start=1000, every=100)     # or fm.EMA(model, decay=0.999), fm.SWAD(model)
    for step, batch in enumerate(batches):
        opt.step(closure)
        avg.update(step)                             # decides whether this step counts
        if swad_eval_due(step):                      # SWAD only
            avg.report_validation(step, val_loss(model))
            if avg.finished:
                break
    final = avg.finalize(train_loader)               # BatchNorm statistics recomputed; averaged model

All averaging is the foreach path (``torch._foreach_lerp_`` through ``get_swa_multi_avg_fn`` /
``get_ema_multi_avg_fn``). Integer tensors (BatchNorm's ``num_batches_tracked``) are never
averaged: they are counters, so the averaged model takes the model's current value.

**Buffers.** ``use_buffers=False`` (SWA, SWAD default): only parameters are averaged; buffers are
copied from the model, so BatchNorm running statistics belong to the *last* model, not to the
averaged weights: pass a loader to ``finalize`` to recompute them for the averaged weights (what
Izmailov et al. do). ``use_buffers=True`` (EMA default): floating buffers are averaged like the
parameters (the mean of the running statistics, a cheap approximation that needs no data pass);
``finalize(loader)`` still recomputes BatchNorm statistics if a loader is given.
"""

from __future__ import annotations

import numbers
import warnings
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn
from torch.optim import swa_utils

from .validation import check, check_bool, check_int, is_real

__all__ = ["SWA", "EMA", "SWAD", "update_bn"]

AvgFn = Callable[[list, list, Any], None]




def _floating(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _split(dst: list[Tensor], src: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    fd, fs, idst, isrc = [], [], [], []
    for d, s in zip(dst, src):
        if _floating(d):
            fd.append(d)
            fs.append(s)
        else:
            idst.append(d)
            isrc.append(s)
    return fd, fs, idst, isrc


class _AvgFn:
    """The ``multi_avg_fn`` given to ``AveragedModel``: a torch foreach averaging function
    (``get_swa_multi_avg_fn`` / ``get_ema_multi_avg_fn``) with two fixes.

    * The count of models already averaged is passed as a Python int (``count``, kept by the
      averager), not ``AveragedModel``'s ``long`` tensor: torch computes SWA's weight
      ``1/(n + 1)`` from that tensor in the default dtype (float32), which limits a float64
      average to ~1e-8 relative accuracy.
    * Integer tensors (BatchNorm's ``num_batches_tracked``) are copied, not averaged: they are
      counters, and torch's functions would truncate an average into them (EMA) or fail (SWA).

    ``AveragedModel`` calls it once per (device, dtype) group.
    """

    def __init__(self, fn: AvgFn):
        self.fn = fn
        self.count = 0

    @torch.no_grad()
    def __call__(self, averaged: list, current: list, num_averaged: Any) -> None:
        if _floating(averaged[0]):
            self.fn(averaged, current, self.count)
        else:
            torch._foreach_copy_(averaged, current)


def _merge_(dst: list[Tensor], dst_count: int, src: list[Tensor], src_count: int) -> None:
    """``dst ← (n_d·dst + n_s·src)/(n_d + n_s)`` for two running means (``lerp`` with weight
    ``n_s/(n_d + n_s)``, the same update as SWA's with ``n_s = 1``); integer tensors take ``src``."""
    with torch.no_grad():
        if dst_count == 0:
            torch._foreach_copy_(dst, src)
            return
        fd, fs, idst, isrc = _split(dst, src)
        if fd:
            torch._foreach_lerp_(fd, fs, src_count / (dst_count + src_count))
        if idst:
            torch._foreach_copy_(idst, isrc)


def _tensors(module: nn.Module, use_buffers: bool) -> list[Tensor]:
    """The tensors an averager averages, in ``AveragedModel``'s order (parameters, then buffers)."""
    out = [p.detach() for p in module.parameters()]
    if use_buffers:
        out += [b.detach() for b in module.buffers()]
    return out


def _check_model(model: Any) -> None:
    check("model", isinstance(model, nn.Module) and any(True for _ in model.parameters()), type(model).__name__,
          "a torch.nn.Module with at least one parameter")


def _check_device(device: Any) -> None:
    ok = device is None or isinstance(device, (str, int, torch.device))
    if ok and device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError):
            ok = False
    check("device", ok, device, "None, a torch.device, a device string or index")


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


# --------------------------------------------------------------------------------------------
# BatchNorm statistics


def _to(batch: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple takes positional fields
        return type(batch)(*(_to(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


class _BatchForward(nn.Module):
    """Calls the wrapped module on one loader batch, whatever its shape.

    ``torch.optim.swa_utils.update_bn`` calls ``model(batch[0])`` for list/tuple batches and
    ``model(batch)`` otherwise; it cannot call ``model(**batch)`` for a dict. The loader is
    re-wrapped so each item is the 1-tuple ``(batch,)`` and this module does the dispatch.
    """

    def __init__(self, module: nn.Module, forward: Optional[Callable[[nn.Module, Any], Any]],
                 device: Optional[torch.device]):
        super().__init__()
        self.module = module
        self.fn = forward
        self.device = device

    def forward(self, batch: Any) -> Any:
        batch = _to(batch, self.device)
        if self.fn is not None:
            return self.fn(self.module, batch)
        if isinstance(batch, Tensor):
            return self.module(batch)
        if isinstance(batch, (list, tuple)):
            return self.module(batch[0])
        if isinstance(batch, Mapping):
            return self.module(**batch)
        raise TypeError(f"Cannot feed a batch of type {type(batch).__name__} to the model: pass "
                        "forward=lambda module, batch: module(...)")


def update_bn(loader: Iterable[Any], module: nn.Module, *, device: Union[None, str, torch.device] = "auto",
              forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> nn.Module:
    """Recompute the BatchNorm running statistics of ``module`` with one pass over ``loader``.

    Runs ``torch.optim.swa_utils.update_bn``: every BatchNorm layer is reset and, with
    ``momentum=None``, accumulates the *cumulative* average of the batch statistics
    (``running_mean = (1/B)·Σ_b mean_b``, ``running_var = (1/B)·Σ_b var_b`` unbiased,
    ``num_batches_tracked = B``), in train mode and without gradients. Batches may be a tensor
    (``module(x)``), a tuple/list whose first element is the input (``module(batch[0])``), a dict
    (``module(**batch)``, the Hugging Face convention) or anything with ``forward(module, batch)``.
    ``device="auto"`` moves the inputs to the module's device (None: leave them where they are).
    Each submodule's train/eval mode and every momentum are restored afterwards; if a batch
    raises, the statistics are restored too.
    """
    if device == "auto":
        first = next(iter(module.parameters()), None)
        device = first.device if first is not None else None
    elif device is not None:
        device = torch.device(device)
    modes = [(m, m.training) for m in module.modules()]
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, [b.clone() for b in m.buffers()]) for m in norms]
    wrapper = _BatchForward(module, forward, device)
    try:
        swa_utils.update_bn(((batch,) for batch in loader), wrapper)
    except BaseException:
        # A batch that fails half-way would leave reset statistics and momentum=None behind.
        with torch.no_grad():
            for m, (momentum, buffers) in zip(norms, saved):
                m.momentum = momentum
                torch._foreach_copy_(list(m.buffers()), buffers)
        raise
    finally:
        # update_bn restores one mode for the whole tree; a model in train mode with a frozen
        # (eval) submodule must come back exactly as it was.
        for m, training in modes:
            m.training = training
    return module


# --------------------------------------------------------------------------------------------
# The averagers


class _Averager:
    """Shared shell: an ``AveragedModel`` copy of ``model``, fed by ``update(step)``."""

    def __init__(self, model: nn.Module, avg_fn: AvgFn, use_buffers: bool, device: Any):
        self.model = model
        self.use_buffers = use_buffers
        self._avg_fn = _AvgFn(avg_fn)
        self.averaged = swa_utils.AveragedModel(model, device=device, multi_avg_fn=self._avg_fn,
                                                use_buffers=use_buffers)
        self.last_step: Optional[int] = None
        self.finalized = False
        # A Python mirror of averaged.n_averaged (see _AvgFn).
        self._count = 0

    @property
    def module(self) -> nn.Module:
        """The averaged model (a copy; the training model is never modified)."""
        return self.averaged.module

    @property
    def n_averaged(self) -> int:
        """How many weight snapshots the average holds."""
        return self._count

    @property
    def finished(self) -> bool:
        """True once averaging has nothing left to do (SWAD: the window has ended); the trainer may stop."""
        return self.finalized

    def _counts(self, step: int) -> bool:
        raise NotImplementedError

    def _accumulate(self) -> None:
        self._avg_fn.count = self._count
        self.averaged.update_parameters(self.model)
        self._count += 1

    def _check_step(self, step: Any) -> None:
        if self.finalized:
            raise RuntimeError(f"{type(self).__name__}.finalize() was called: averaging has ended")
        check_int("step", step, 0)
        if self.last_step is not None:
            check("step", step > self.last_step, step, f"a step after the last updated step {self.last_step}")

    def update(self, step: int) -> bool:
        """Call after every optimizer step with its index; returns whether the weights were averaged."""
        self._check_step(step)
        self.last_step = step
        if not self._counts(step):
            return False
        self._accumulate()
        return True

    def _prepare_final(self) -> None:
        if self.n_averaged == 0:
            raise RuntimeError(f"{type(self).__name__}: no step was averaged yet (last step: {self.last_step})")

    def finalize(self, loader: Optional[Iterable[Any]] = None, *, device: Union[None, str, torch.device] = "auto",
                 forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> nn.Module:
        """End averaging and return the averaged model (``self.module``).

        With a ``loader``, BatchNorm statistics are recomputed for the averaged weights
        (:func:`update_bn`; see there for the batch shapes accepted). The training model is not
        touched. Afterwards ``update`` raises: BatchNorm statistics recomputed here would otherwise
        mix into a buffer average (``use_buffers=True``).
        """
        if self.finalized:
            raise RuntimeError(f"{type(self).__name__}.finalize() was already called")
        self._prepare_final()
        if loader is not None:
            update_bn(loader, self.module, device=device, forward=forward)
        elif not self.use_buffers and _has_batchnorm(self.module):
            warnings.warn(f"{type(self).__name__}.finalize() without a loader: the BatchNorm statistics are the "
                          "training model's, not the averaged weights'; pass a loader to recompute them",
                          stacklevel=2)
        self.finalized = True
        return self.module

    # -- state

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        """The averaged tensors (``AveragedModel.state_dict()``), the counters and any window state."""
        return {"averaged": self.averaged.state_dict(), "last_step": self.last_step, "finalized": self.finalized,
                **self._extra_state()}

    def load_state_dict(self, state: dict) -> None:
        expected = set(self.state_dict())
        check("state", isinstance(state, Mapping) and set(state) == expected,
              sorted(state) if isinstance(state, Mapping) else type(state).__name__,
              f"a {type(self).__name__}.state_dict() with keys {sorted(expected)}")
        self.averaged.load_state_dict(state["averaged"])
        self.last_step = state["last_step"]
        self.finalized = bool(state["finalized"])
        self._count = int(self.averaged.n_averaged)
        self._load_extra_state(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_averaged={self.n_averaged}, last_step={self.last_step})"


def _schedule_counts(step: int, start: int, every: int) -> bool:
    return step >= start and (step - start) % every == 0


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
    "SWAD: Domain Generalization by Seeking Flat Minima"; seed 001).

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
