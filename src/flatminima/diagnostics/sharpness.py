"""Sharpness of a minimum: worst case in a ball, average under Gaussian noise, and m-sharpness.

* **Worst case** (Foret et al. 2021): ``S_ρ(w) = max_{‖T⁻¹ε‖_p ≤ ρ} L(w + ε) − L(w)`` for
  the L2 or L∞ ball, with ``T = 1`` or an adaptive ``T`` (ASAM, Kwon et al. 2021: ``T = |w| + η``
  element-wise or ``‖w_i‖ + η`` filter-wise; any :class:`flatminima.core.scale.Scale`). The maximum is
  searched by the multi-step projected ascent of Zhang et al. (2021) that GA-SAM uses (Zhang et
  al., EMNLP 2022, eqs. 16–18): ``u_k = η·T ⊙ dual(T ⊙ ∇L(w + a_{k−1}))``, ``a_k = Π(a_{k−1} + u_k)``, with step
  ``η = 1.5ρ/K`` by default. The estimate is the highest loss met on the path ``a_0 … a_K`` (and at
  ``a = 0``, a feasible point, so it is never negative): a lower bound on the true maximum that
  grows with the steps. From ``a_0 = 0`` one step with ``η ≥ ρ`` is exactly SAM's ``ε``; at a
  stationary point (zero gradient) start from ``init="random"`` (uniform in the ball, as PGD).
* **Average case** (the Bayes objective of RWP/LPF-SGD; Li et al., TMLR 2024):
  ``E_ε[L(w + ε)] − L(w)``, ``ε = σ·Z ⊙ S``, ``Z ~ N(0, I)``, ``S`` uniform (1), filter-wise ``‖w_i‖`` (output row; a 1-D
  tensor uses its own norm, as in the RWP code), layer-wise ``‖W‖_F`` or element-wise ``|w|``;
  reported with the standard error of the mean over samples.
* **m-sharpness** (Foret et al. 2021, §4): the worst-case sharpness computed on each batch of ``m``
  examples and averaged over batches; ``m`` = the whole data set is the plain worst case.

Random draws come from a ``torch.Generator`` seeded with ``seed`` (never the global RNG), and every
evaluation substitutes parameter values through :class:`~.objective.Objective`, so the model is
left as it was. Under ``torch.distributed`` (``distributed``, :mod:`.objective`) every loss and
gradient is reduced over the ranks' data: the values are those of one process on all of it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..core.kernels import _mul, ascent_direction, clone, dual_direction, global_norm, inverse, project, reduction_dtype
from ..core.validation import check, check_choice, check_int, check_nonnegative, check_positive
from ..core.scale import Scale, group_norms
from .objective import LossFn, Objective, ParamSpec, batch_size, is_batch

#: Ball norms the projected ascent supports (GA-SAM eqs. 17–18).
NORMS = (2, "inf")
#: Adaptive balls by name: ASAM's element-wise ``|w| + η`` and filter-wise ``‖w_i‖ + η``.
BALL_SCALES = ("element", "filter")
#: Scales ``S`` of Gaussian noise.
NOISE_SCALES = ("uniform", "filter", "layer", "element")
INITS = ("zero", "random")
ScaleSpec = Union[None, str, Scale]


# -- results ---------------------------------------------------------------------------------


def _plain(x: Any) -> Any:
    """JSON-ready: arrays to lists, numpy scalars to Python, non-finite floats to None."""
    if isinstance(x, np.ndarray):
        return _plain(x.tolist())
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


class Result:
    """Base of the diagnostics' result dataclasses: ``to_dict()`` gives plain JSON-ready values."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def stderr(values: Sequence[float]) -> Optional[float]:
    """Standard error of the mean, ``std(ddof=1)/√n`` (None for fewer than two values)."""
    v = np.asarray(values, dtype=float)
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None


@dataclass
class Sharpness(Result):
    """Worst-case sharpness ``max_{‖T⁻¹ε‖_p ≤ ρ} L(w+ε) − L(w)`` (estimate from below)."""

    sharpness: float          #: ``perturbed_loss − loss``
    loss: float               #: ``L(w)``
    perturbed_loss: float     #: the highest loss found in the ball
    rho: float
    norm: str                 #: ``"L2"`` or ``"Linf"``
    scale: str                #: ``"uniform"``, ``"element"``, ``"filter"`` or a Scale's repr
    steps: int
    step_size: float
    best_step: int            #: index on ``path`` of the best point (−1: the origin)
    perturbation_norm: float  #: ``‖T⁻¹ε‖_p`` of the best point
    path: np.ndarray          #: ``L(w + a_k)`` for ``k = 0..K``


@dataclass
class AverageSharpness(Result):
    """Average-case sharpness ``E_ε[L(w+ε)] − L(w)``, ``ε = σ·Z ⊙ S``."""

    sharpness: float               #: mean of ``values``
    stderr: Optional[float]        #: its standard error (None for one sample)
    loss: float                    #: ``L(w)``
    perturbed_loss: float          #: mean of ``L(w + ε_s)``
    sigma: float
    scale: str
    samples: int
    values: np.ndarray             #: ``L(w + ε_s) − L(w)`` per sample


@dataclass
class MSharpness(Result):
    """m-sharpness: the worst-case sharpness per batch of ``m`` examples, averaged (weighted by size)."""

    sharpness: float
    stderr: Optional[float]        #: standard error over batches (unweighted)
    m: Optional[int]               #: None: the batches as given
    rho: float
    norm: str
    steps: int
    values: np.ndarray             #: sharpness per batch
    sizes: np.ndarray              #: examples per batch


# -- argument checks (before anything runs) --------------------------------------------------


def check_ball_norm(norm: Any) -> float:
    """``2`` or ``'inf'`` (``math.inf``) as a float; ValueError otherwise."""
    return float(check_choice("norm", norm, (2, "inf", math.inf)))


def norm_label(p: float) -> str:
    return "Linf" if p == math.inf else "L2"


def _check_ascent(rho: Any, norm: Any, steps: Any, step_size: Any, init: Any) -> tuple[float, float, float]:
    rho = check_nonnegative("rho", rho)
    p = check_ball_norm(norm)
    check_int("steps", steps, 1)
    if step_size is not None:
        check_positive("step_size", step_size)
    check("init", init in INITS, init, f"one of {', '.join(INITS)}")
    return rho, p, 1.5 * rho / steps if step_size is None else float(step_size)


def _check_ball_scale(scale: ScaleSpec, eta: Any) -> None:
    check("scale", scale is None or scale in BALL_SCALES or isinstance(scale, Scale), scale,
          f"None, one of {', '.join(BALL_SCALES)}, or a flatminima.core.scale.Scale")
    check_nonnegative("eta", eta)


# -- the machinery shared by sharpness, robustness and landscapes -----------------------------


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator of its own on ``device`` (the global RNG is never drawn from)."""
    return torch.Generator(device=device).manual_seed(seed)


def gaussian(like: Sequence[Tensor], gen: torch.Generator) -> list[Tensor]:
    """``Z ~ N(0, I)`` shaped like ``like``, in the reduction dtype (float32 for low-precision weights)."""
    return [torch.randn(t.shape, generator=gen, device=t.device, dtype=reduction_dtype(t)) for t in like]


def shifted(point: Sequence[Tensor], *terms: tuple[float, Sequence[Tensor]]) -> list[Tensor]:
    """``w + Σ_k c_k·d_k`` as new tensors (the point is a view of the model's own tensors: never
    written), formed in the reduction dtype and cast back to each parameter's dtype."""
    out = [w.to(reduction_dtype(w), copy=True) for w in point]
    for c, d in terms:
        torch._foreach_add_(out, list(d), alpha=c)
    return [o if o.dtype == w.dtype else o.to(w.dtype) for o, w in zip(out, point)]


def ball_scale(scale: ScaleSpec, eta: float, point: Sequence[Tensor], grads: Optional[Sequence[Tensor]]) -> list:
    """``T`` per tensor (None entries mean 1) for the ball ``‖T⁻¹ε‖_p ≤ ρ``."""
    if scale is None:
        return [None] * len(point)
    if isinstance(scale, str):
        scale = Scale("w", scale, eta)
    grads = [torch.zeros_like(w) for w in point] if grads is None else grads
    return [None if t is None else t.to(reduction_dtype(w)) for t, w in zip(scale(point, grads), point)]


def needs_gradient(scale: ScaleSpec) -> bool:
    return isinstance(scale, Scale) and scale.kind in ("w_over_g", "inv_g", "gradient_strength")


def scale_label(scale: ScaleSpec) -> str:
    return "uniform" if scale is None else scale if isinstance(scale, str) else repr(scale)


def random_in_ball(like: Sequence[Tensor], T: Sequence[Optional[Tensor]], radius: float, p: float,
                   gen: torch.Generator, boundary: bool = False) -> list[Tensor]:
    """A random point of ``{a : ‖T⁻¹a‖_p ≤ radius}``: uniform in the ball (PGD's random start), or
    on its boundary (``boundary=True``: a uniform direction on the L2 sphere, a uniform vertex of the
    L∞ cube), so ``‖T⁻¹a‖_p = radius`` exactly."""
    z = gaussian(like, gen)
    if boundary or p == 2:
        a = dual_direction(z, p, factor=radius)  # z/‖z‖₂ (uniform on the sphere) or sign(z)
        if not boundary:
            n = sum(t.numel() for t in like)
            u = torch.rand((), generator=gen, device=z[0].device, dtype=z[0].dtype)
            torch._foreach_mul_(a, u ** (1.0 / n))  # radius ρ·U^{1/n}: uniform in the ball
    else:
        a = [torch.rand(t.shape, generator=gen, device=t.device, dtype=t.dtype).mul_(2).sub_(1).mul_(radius) for t in z]
    return _mul(a, T)


@dataclass
class Ascent:
    """What :func:`ascend` found: losses on the path, the clean loss, the best point."""

    clean: float
    path: list[float]
    best: int                       #: index into ``path``; −1 when the origin is best
    perturbation: list[Tensor]      #: ``a`` at the best point
    norm: float                     #: ``‖T⁻¹a‖_p`` at the best point

    @property
    def best_loss(self) -> float:
        return self.clean if self.best < 0 else self.path[self.best]


def ascend(objective: Objective, rho: float, p: float, steps: int, step_size: float, T: Sequence[Optional[Tensor]],
           init: str = "zero", gen: Optional[torch.Generator] = None, clean: Optional[float] = None) -> Ascent:
    """Projected multi-step ascent on ``L`` over ``{a : ‖T⁻¹a‖_p ≤ ρ}`` (Zhang et al. 2021; GA-SAM
    eqs. 16–18): ``a_k = Π(a_{k−1} + η·T ⊙ dual(T ⊙ ∇L(w + a_{k−1})))``, ``K = steps`` gradient
    evaluations over all of the objective's data and one last loss evaluation. Keeps the best point
    (one perturbation-sized copy)."""
    w = objective.point()
    inv_T = inverse(T)
    radius = [rho] * len(w)
    if init == "zero":
        a = [torch.zeros(t.shape, device=t.device, dtype=reduction_dtype(t)) for t in w]
    else:
        a = random_in_ball(w, T, rho, p, gen)
    path: list[float] = []
    best, best_a = -1, None
    for k in range(steps + 1):
        if k < steps:
            loss, g = objective.gradient(shifted(w, (1.0, a)))
        else:
            loss = objective.value(shifted(w, (1.0, a)))
        if k == 0 and init == "zero":
            clean = loss
        path.append(loss)
        if best_a is None or loss > path[best]:
            best, best_a = k, clone(a)
        if k < steps:
            g = [x.to(reduction_dtype(x)) for x in g]
            torch._foreach_add_(a, ascent_direction(g, T, p, factor=step_size))
            project(a, T, radius, p, inv_scale=inv_T)
    clean = objective.value() if clean is None else clean
    if path[best] <= clean:  # the origin is in the ball: never report less than L(w)
        best, best_a = -1, [torch.zeros_like(x) for x in a]
    norm = float(global_norm(_mul(best_a, inv_T), p)) if best_a else 0.0
    return Ascent(clean, path, best, best_a, norm)


# -- worst case ------------------------------------------------------------------------------


def worst_case_sharpness(model: nn.Module, loss_fn: LossFn, data: Any, rho: float = 0.05, norm: Any = 2,
                         steps: int = 10, step_size: Optional[float] = None, scale: ScaleSpec = None,
                         eta: float = 0.01, init: str = "zero", params: ParamSpec = None, mode: str = "eval",
                         seed: int = 0, distributed: Optional[bool] = None) -> Sharpness:
    """``max_{‖T⁻¹ε‖_p ≤ ρ} L(w+ε) − L(w)`` over all of ``data`` by ``steps`` projected ascent steps
    (module docstring).

    ``norm``: 2 or ``"inf"``. ``step_size``: default ``1.5ρ/steps`` (Zhang et al. 2021; GA-SAM):
    the path is 1.5ρ long, enough to reach the boundary and move along it; for a converged maximum
    raise ``steps`` or use ``step_size ≈ ρ`` (the update is then a power iteration on the sphere).
    ``scale``: None (``T = 1``), ``"element"`` (ASAM ``T = |w| + η``), ``"filter"`` (``‖w_i‖ + η``
    per output row) or a :class:`~flatminima.core.scale.Scale` (gradient-based scales use the clean
    gradient). ``init``: ``"zero"`` (the training methods' start) or ``"random"``. ``distributed``:
    reduce over the ranks' data (None: when a process group is initialized). Cost: ``steps``
    forward+backward passes over ``data`` and one or two forward passes.
    """
    rho, p, step_size = _check_ascent(rho, norm, steps, step_size, init)
    _check_ball_scale(scale, eta)
    objective = Objective(model, loss_fn, data, params, mode, seed, distributed)
    return _worst_case(objective, rho, p, steps, step_size, scale, float(eta), init,
                       generator(objective.device, seed))


def _worst_case(objective: Objective, rho: float, p: float, steps: int, step_size: float, scale: ScaleSpec,
                eta: float, init: str, gen: torch.Generator) -> Sharpness:
    clean, grads = None, None
    if needs_gradient(scale):
        clean, grads = objective.gradient()
    T = ball_scale(scale, eta, objective.point(), grads)
    run = ascend(objective, rho, p, steps, step_size, T, init, gen, clean)
    return Sharpness(sharpness=run.best_loss - run.clean, loss=run.clean, perturbed_loss=run.best_loss, rho=rho,
                     norm=norm_label(p), scale=scale_label(scale), steps=steps, step_size=step_size,
                     best_step=run.best, perturbation_norm=run.norm, path=np.asarray(run.path))


# -- average case ----------------------------------------------------------------------------


def noise_scale(kind: str, point: Sequence[Tensor]) -> list[Optional[Tensor]]:
    """``S`` per tensor for Gaussian noise ``σ·Z ⊙ S`` (None for uniform)."""
    if kind == "uniform":
        return [None] * len(point)
    granularity = {"filter": "filter", "layer": "layer", "element": "element"}[kind]
    with torch.no_grad():
        return [s.to(reduction_dtype(w)) for s, w in zip(group_norms(point, granularity), point)]


def average_sharpness(model: nn.Module, loss_fn: LossFn, data: Any, sigma: float = 0.01, samples: int = 10,
                      scale: str = "uniform", params: ParamSpec = None, mode: str = "eval",
                      seed: int = 0, distributed: Optional[bool] = None) -> AverageSharpness:
    """``E_ε[L(w+ε)] − L(w)``, ``ε = σ·Z ⊙ S``, estimated from ``samples`` draws over all of ``data``,
    with its standard error ``std/√samples``.

    ``scale`` (``S``): ``"uniform"`` (1: isotropic ``N(0, σ²I)``), ``"filter"`` (``‖w_i‖₂`` of the
    output row, RWP/LPF-SGD; a 1-D tensor uses its own norm), ``"layer"`` (``‖W‖_F``) or
    ``"element"`` (``|w|``). On ``½xᵀAx`` with uniform noise the value is ``½σ²·tr(A)`` plus
    the first-order term, which vanishes in expectation. Cost: ``samples + 1`` forward passes.
    """
    sigma = check_nonnegative("sigma", sigma)
    check_int("samples", samples, 1)
    check("scale", scale in NOISE_SCALES, scale, f"one of {', '.join(NOISE_SCALES)}")
    objective = Objective(model, loss_fn, data, params, mode, seed, distributed)
    gen = generator(objective.device, seed)
    w = objective.point()
    S = noise_scale(scale, w)
    clean = objective.value()
    losses = []
    for _ in range(samples):
        eps = _mul(gaussian(w, gen), S)
        losses.append(objective.value(shifted(w, (sigma, eps))))
    values = np.asarray(losses) - clean
    return AverageSharpness(sharpness=float(values.mean()), stderr=stderr(values), loss=clean,
                            perturbed_loss=float(np.mean(losses)), sigma=sigma, scale=scale, samples=samples,
                            values=values)


# -- m-sharpness -----------------------------------------------------------------------------


def split_batch(batch: Any, m: int) -> list[Any]:
    """``batch`` cut along its leading dimension into chunks of ``m`` examples (the last may be
    smaller). Tensors with another leading size (and non-tensors) are repeated in every chunk."""
    n = batch_size(batch)
    starts = range(0, n, m)

    def cut(v, s):
        return v[s:s + m] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v

    if torch.is_tensor(batch):
        return [batch[s:s + m] for s in starts]
    if isinstance(batch, dict):
        return [type(batch)({k: cut(v, s) for k, v in batch.items()}) for s in starts]
    return [type(batch)(cut(v, s) for v in batch) for s in starts]


def _chunks(data: Any, m: Optional[int]) -> Iterator[Any]:
    batches = [data] if is_batch(data) else data
    for batch in batches:
        yield from ([batch] if m is None else split_batch(batch, m))


def m_sharpness(model: nn.Module, loss_fn: LossFn, data: Any, m: Optional[int] = None, rho: float = 0.05,
                norm: Any = 2, steps: int = 10, step_size: Optional[float] = None, scale: ScaleSpec = None,
                eta: float = 0.01, init: str = "zero", params: ParamSpec = None, mode: str = "eval",
                seed: int = 0, distributed: Optional[bool] = None) -> MSharpness:
    """m-sharpness (Foret et al. 2021): ``Σ_B |B|·S_ρ(w; B) / Σ_B |B|`` where ``S_ρ(w; B)`` is the
    worst-case sharpness (:func:`worst_case_sharpness`, same arguments) on batch ``B`` alone and
    the batches are those of ``data`` cut into ``m`` examples each (``m=None``: as given).
    Since a maximum of a mean is at most the mean of the maxima, the value is at least the
    worst-case sharpness on the same data (up to the ascent's accuracy); with one batch of all the
    data it is that sharpness. One generator seeded with ``seed`` serves the batches in order.
    Distributed, each chunk stays a rank's own and the values of every rank are gathered in rank
    order (with ``init="random"`` each rank's generator starts afresh).
    """
    rho, p, step_size = _check_ascent(rho, norm, steps, step_size, init)
    _check_ball_scale(scale, eta)
    if m is not None:
        check_int("m", m, 1)
    whole = Objective(model, loss_fn, data, params, mode, seed, distributed)
    gen, values, sizes = None, [], []
    for chunk in _chunks(data, m):
        objective = Objective(model, loss_fn, chunk, whole.params, mode, seed, distributed=False)
        gen = generator(objective.device, seed) if gen is None else gen
        values.append(_worst_case(objective, rho, p, steps, step_size, scale, float(eta), init, gen).sharpness)
        sizes.append(batch_size(chunk))
    check("data", bool(values), type(data).__name__, "a batch or a non-empty iterable of batches")
    rows = whole.gather(list(zip(values, sizes)))
    v, n = np.asarray([r[0] for r in rows]), np.asarray([r[1] for r in rows])
    return MSharpness(sharpness=float((v * n).sum() / n.sum()), stderr=stderr(v), m=m, rho=rho, norm=norm_label(p),
                      steps=steps, values=v, sizes=n)
