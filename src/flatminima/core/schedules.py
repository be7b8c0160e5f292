"""Schedules (the "schedule" axis of a method): how strong a perturbation is, and when it happens.

*Strength schedules* return a multiplier of a parameter group's strength (ρ, ε, σ) at a step:
``Constant``, ``Linear``, ``Cosine`` (cosine-increasing, LPF-SGD; the ``½(1 − cos πt/T)`` ramp of
Flat-LoRA is ``Cosine(T, 0, 1)``), ``ProportionalToLR`` (ρ_t = ρ·lr_t/lr_0) or any callable of the
step. ``strength_schedule("cosine", total_steps=...)`` builds one from a name.

*Triggers* decide whether a step perturbs at all. ``before(step)`` answers before the clean pass
(``None``: decide after it from the clean gradient with ``after``); state that must only change
when the optimizer really steps (an AMP-skipped step leaves it alone) is returned as a commit.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from .validation import check, check_int, check_nonnegative, check_range, check_real, is_real


def _check_total(total_steps: Any) -> int:
    return check_int("total_steps", total_steps, 1)


def check_total_steps(total_steps: Any) -> Optional[int]:
    """``None`` or an int ``>= 1`` (checked whether or not the schedule uses it)."""
    return None if total_steps is None else _check_total(total_steps)


def _checked_multiplier(value: Any, step: int) -> float:
    """A schedule's output as a float, refused unless finite and ``>= 0``: a negative multiplier
    would turn the ascent into a descent and NaN would reach the weights. It is read before ε is
    made, so a refused value leaves the weights untouched."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = math.nan
    check(f"schedule output at step {step}", math.isfinite(out) and out >= 0, value, "a finite number >= 0")
    return out


class StrengthSchedule:
    """Multiplier of the group strength at optimizer step ``step`` (0-based).

    Every subclass's ``__call__`` (a user's too) is wrapped so that its output is checked
    (:func:`_checked_multiplier`) where it is produced: the optimizer needs no check of its own.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        call = cls.__dict__.get("__call__")
        if call is not None and not getattr(call, "_checked", False):
            @functools.wraps(call)
            def checked(self, step: int, group: dict) -> float:
                return _checked_multiplier(call(self, step, group), step)

            checked._checked = True
            cls.__call__ = checked

    def __call__(self, step: int, group: dict) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Constant(StrengthSchedule):
    def __call__(self, step: int, group: dict) -> float:
        return 1.0


class Linear(StrengthSchedule):
    """``start + (end − start)·min(t/T, 1)``."""

    def __init__(self, total_steps: int, start: float = 0.0, end: float = 1.0):
        self.total_steps = _check_total(total_steps)
        self.start, self.end = check_nonnegative("start", start), check_nonnegative("end", end)

    def __call__(self, step: int, group: dict) -> float:
        frac = min(step / self.total_steps, 1.0)
        return self.start + (self.end - self.start) * frac


class Cosine(StrengthSchedule):
    """``start + (end − start)·½(1 − cos(π·min(t/T, 1)))``: cosine from ``start`` to ``end``."""

    def __init__(self, total_steps: int, start: float = 0.0, end: float = 1.0):
        self.total_steps = _check_total(total_steps)
        self.start, self.end = check_nonnegative("start", start), check_nonnegative("end", end)

    def __call__(self, step: int, group: dict) -> float:
        frac = min(step / self.total_steps, 1.0)
        return self.start + (self.end - self.start) * 0.5 * (1.0 - math.cos(math.pi * frac))


class ProportionalToLR(StrengthSchedule):
    """``lr_t / lr_0`` of the group (``lr_0`` = the group's ``initial_lr``, as LR schedulers keep it).

    ``lr_0 = 0`` leaves the ratio undefined and is refused at the first step that reads it (not at
    construction: ``OneCycleLR`` and ``CyclicLR`` set ``initial_lr`` when they are created, which
    may be after the method). A warm-up from 0 through a scheduler keeps ``initial_lr`` at the base
    lr, so it runs (ρ_t = 0 at lr_t = 0).
    """

    def __call__(self, step: int, group: dict) -> float:
        lr0 = float(group["initial_lr"])
        check("schedule 'lr'", lr0 > 0, f"initial_lr = {lr0} at step {step}",
              "a param group initial_lr > 0 (ρ·lr_t/lr_0 is undefined for lr_0 = 0: give the optimizer its base lr)")
        return float(group["lr"]) / lr0


class FromCallable(StrengthSchedule):
    """``fn(step)``; its output is checked like every schedule's (finite, ``>= 0``)."""

    def __init__(self, fn: Callable[[int], float]):
        self.fn = fn

    def __call__(self, step: int, group: dict) -> float:
        return self.fn(step)


SCHEDULE_NAMES = ("constant", "linear", "cosine", "lr")


def strength_schedule(spec: Union[None, str, StrengthSchedule, Callable[[int], float]], total_steps: Optional[int] = None) -> StrengthSchedule:
    """Build a schedule from a name (``constant``, ``linear``, ``cosine``, ``lr``), an instance or a callable.

    ``linear`` and ``cosine`` ramp 0 → 1 over ``total_steps``.
    """
    check_total_steps(total_steps)
    if spec is None or spec == "constant":
        return Constant()
    if isinstance(spec, StrengthSchedule):
        return spec
    if isinstance(spec, str):
        if spec == "lr":
            return ProportionalToLR()
        if spec in ("linear", "cosine"):
            check("total_steps", total_steps is not None, total_steps, f"an int >= 1 for schedule {spec!r}")
            return (Linear if spec == "linear" else Cosine)(total_steps)
    check("schedule", callable(spec), spec, f"one of {', '.join(SCHEDULE_NAMES)}, a StrengthSchedule or a callable of the step")
    return FromCallable(spec)


# --------------------------------------------------------------------------------------------
# Triggers


class Trigger:
    """Decides, per step, whether the method perturbs."""

    def before(self, step: int) -> Optional[bool]:
        return True

    def after(self, step: int, grad_sq_norm: Callable[[], Tensor]) -> tuple[bool, Optional[Callable[[], None]]]:
        """Decision from the clean gradient; returns (fire, commit)."""
        return True, None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Always(Trigger):
    pass


class Never(Trigger):
    def before(self, step: int) -> Optional[bool]:
        return False


class StartAt(Trigger):
    """Perturb from step ``start_step`` on (GA-SAM skips the early phase on Transformers)."""

    def __init__(self, start_step: int, then: Trigger | None = None):
        self.start_step, self.then = start_step, then or Always()

    def before(self, step: int) -> Optional[bool]:
        return False if step < self.start_step else self.then.before(step)

    def after(self, step, grad_sq_norm):
        return self.then.after(step, grad_sq_norm)

    def state_dict(self) -> dict:
        return self.then.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.then.load_state_dict(state)


class Every(Trigger):
    """Perturb on steps ``0, k, 2k, …`` (LookSAM's full SAM steps)."""

    def __init__(self, k: int):
        self.k = k

    def before(self, step: int) -> Optional[bool]:
        return step % self.k == 0


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64 steps): stable across runs and Python versions."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, step, stream): reproducible, resumable from the step
    count alone, and independent of the global RNG."""
    return torch.Generator().manual_seed(derive_seed(seed, step, stream))


class Probability(Trigger):
    """Perturb with probability ``p`` (a float, or a callable of the step): SS-SAM / RST.

    The coin comes from a generator seeded by (seed, step), so the decision is reproducible and
    never touches the global RNG.
    """

    def __init__(self, p: Union[float, Callable[[int], float]], seed: int = 0):
        if not callable(p):
            check("p", is_real(p) and 0 <= p <= 1, p, "a number in [0, 1] or a callable of the step")
        self.p, self.seed = p, check_int("seed", seed, 0)

    def probability(self, step: int) -> float:
        p = self.p(step) if callable(self.p) else self.p
        try:
            p = float(p)
        except (TypeError, ValueError):
            p = math.nan
        check(f"p at step {step}", 0.0 <= p <= 1.0, p, "a probability in [0, 1]")
        return p

    def before(self, step: int) -> Optional[bool]:
        u = torch.rand((), generator=step_generator(self.seed, step, stream=1)).item()
        return u < self.probability(step)


class AdaptiveThreshold(Trigger):
    """AE-SAM (Jiang et al. 2023): SAM when ``‖g‖² ≥ μ_t + c_t·σ_t``.

    ``μ_t = δμ_{t−1} + (1−δ)‖g_t‖²``, ``σ²_t = δσ²_{t−1} + (1−δ)(‖g_t‖² − μ_t)²`` (EMA with decay
    ``δ``), ``c_t`` linear from ``c_start`` to ``c_end`` over ``total_steps`` (their mean when
    ``total_steps`` is None: with the defaults, SAM on the steps whose ``‖g‖²`` is above average). The statistics are updated before the comparison, as in the paper's
    Algorithm 1, and only when the optimizer really steps.
    """

    def __init__(self, decay: float = 0.9, c_start: float = -1.0, c_end: float = 1.0, total_steps: Optional[int] = None):
        self.decay = check_range("decay", decay, 0.0, 1.0, high_open=True)
        self.c_start, self.c_end = check_real("c_start", c_start), check_real("c_end", c_end)
        self.total_steps = check_total_steps(total_steps)
        self.mean: Optional[float] = None
        self.var = 0.0

    def c(self, step: int) -> float:
        if self.total_steps is None:
            return 0.5 * (self.c_start + self.c_end)
        return self.c_start + (self.c_end - self.c_start) * min(step / self.total_steps, 1.0)

    def before(self, step: int) -> Optional[bool]:
        return None

    def after(self, step, grad_sq_norm):
        sq = float(grad_sq_norm())  # the decision needs the value on the host: one sync per step
        if self.mean is None:
            mean, var = sq, 0.0
        else:
            d = self.decay
            mean = d * self.mean + (1 - d) * sq
            var = d * self.var + (1 - d) * (sq - mean) ** 2
        fire = sq >= mean + self.c(step) * math.sqrt(var)

        def commit():
            self.mean, self.var = mean, var

        return fire, commit

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var = state["mean"], state["var"]
