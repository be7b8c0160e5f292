"""The shell every averager shares (an ``AveragedModel`` fed by ``update(step)``) and its tensor helpers."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn
from torch.optim import swa_utils

from ..core.validation import check, check_int
from .bn import _has_batchnorm, update_bn

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
