"""Schedules (DESIGN.md §2, "schedule" axis): how strong a perturbation is, and when it happens.

*Strength schedules* return a multiplier of a parameter group's strength (ρ, ε, σ) at a step:
``Constant``, ``Linear``, ``Cosine`` (cosine-increasing, LPF-SGD; the ``½(1 − cos πt/T)`` ramp of
Flat-LoRA is ``Cosine(T, 0, 1)``), ``ProportionalToLR`` (ρ_t = ρ·lr_t/lr_0) or any callable of the
step. ``strength_schedule("cosine", total_steps=...)`` builds one from a name.

*Triggers* decide whether a step perturbs at all. ``before(step)`` answers before the clean pass
(``None``: decide after it from the clean gradient with ``after``); state that must only change
when the optimizer really steps (an AMP-skipped step leaves it alone) is returned as a commit.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor


def _check_total(total_steps: Any) -> int:
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
        raise ValueError(f"Invalid total_steps: {total_steps!r} (expected an int >= 1)")
    return total_steps


class StrengthSchedule:
    """Multiplier of the group strength at optimizer step ``step`` (0-based)."""

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
        self.total_steps, self.start, self.end = _check_total(total_steps), float(start), float(end)

    def __call__(self, step: int, group: dict) -> float:
        frac = min(step / self.total_steps, 1.0)
        return self.start + (self.end - self.start) * frac


class Cosine(StrengthSchedule):
    """``start + (end − start)·½(1 − cos(π·min(t/T, 1)))``: cosine from ``start`` to ``end``."""

    def __init__(self, total_steps: int, start: float = 0.0, end: float = 1.0):
        self.total_steps, self.start, self.end = _check_total(total_steps), float(start), float(end)

    def __call__(self, step: int, group: dict) -> float:
        frac = min(step / self.total_steps, 1.0)
        return self.start + (self.end - self.start) * 0.5 * (1.0 - math.cos(math.pi * frac))


class ProportionalToLR(StrengthSchedule):
    """``lr_t / lr_0`` of the group (``lr_0`` = the group's ``initial_lr``, as LR schedulers keep it)."""

    def __call__(self, step: int, group: dict) -> float:
        return float(group["lr"]) / float(group["initial_lr"])


class FromCallable(StrengthSchedule):
    def __init__(self, fn: Callable[[int], float]):
        self.fn = fn

    def __call__(self, step: int, group: dict) -> float:
        return float(self.fn(step))


SCHEDULE_NAMES = ("constant", "linear", "cosine", "lr")


def strength_schedule(spec: Union[None, str, StrengthSchedule, Callable[[int], float]], total_steps: Optional[int] = None) -> StrengthSchedule:
    """Build a schedule from a name (``constant``, ``linear``, ``cosine``, ``lr``), an instance or a callable.

    ``linear`` and ``cosine`` ramp 0 → 1 over ``total_steps``.
    """
    if spec is None or spec == "constant":
        return Constant()
    if isinstance(spec, StrengthSchedule):
        return spec
    if isinstance(spec, str):
        if spec == "lr":
            return ProportionalToLR()
        if spec in ("linear", "cosine"):
            if total_steps is None:
                raise ValueError(f"schedule {spec!r} needs total_steps (an int >= 1)")
            return (Linear if spec == "linear" else Cosine)(total_steps)
        raise ValueError(f"Invalid schedule {spec!r}: expected one of {', '.join(SCHEDULE_NAMES)} or a callable of the step")
    if callable(spec):
        return FromCallable(spec)
    raise ValueError(f"Invalid schedule {spec!r}: expected one of {', '.join(SCHEDULE_NAMES)} or a callable of the step")


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
        self.p, self.seed = p, seed

    def probability(self, step: int) -> float:
        p = float(self.p(step)) if callable(self.p) else float(self.p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Invalid p: {p!r} at step {step} (expected 0 <= p <= 1)")
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
        self.decay, self.c_start, self.c_end, self.total_steps = decay, c_start, c_end, total_steps
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
