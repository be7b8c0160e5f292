"""The gauge freedom of LoRA: factor-space curvature is not a property of the function.

A LoRA layer (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") computes with
``W = W0 + s·P(B A)`` (``B`` is ``|rows| × r``, ``A`` is ``r × n_in``, ``P`` places the product in
the adapter's output rows; :mod:`flatminima.lora.protocol`). For any invertible ``r × r`` matrix
``S`` the *gauge transform*

    ``B' = B S,   A' = S⁻¹ A``   (so ``B'A' = BA``)

leaves every layer's weight, hence the model's function and its loss, unchanged: the LoRA
factorization's scaling symmetry (cf. BAR, Li et al. 2024, which picks the balanced gauge). What
it changes is curvature measured *in factor space*. With ``θ = (B, A)`` per adapter,
``G = ∇_W L`` and ``H_W = ∇²_W L``,

    ``H_θ = Jᵀ H_W J + K``,   ``J(dB, dA) = s·P(dB A + B dA)``,   ``(dB, dA)ᵀ K (dB, dA) = 2s·⟨G_rows, dB dA⟩``

(``K`` is the curvature of the product term; it vanishes at a stationary point of ``L`` in
``W``). Under the gauge, ``dB = dB' S⁻¹`` and ``dA = S dA'``, so ``H_θ' = Mᵀ H_θ M`` with ``M``
that linear map: a congruence, not a similarity, and ``λ_max(H_θ)`` moves unless ``S`` is
orthogonal. The SAM ball ``‖ε_θ‖ ≤ ρ`` is also a different set of functions in each gauge. The
*effective-weight* quantities, taken with respect to ``D`` in ``L(W0 + D + s·BA)`` at ``D = 0``,
are ``H_W`` and the sharpness in ``W``: they depend on the function only. Example, ``L`` isotropic
``½h‖W − W*‖²`` at its minimum: ``λ_max(H_W) = h`` in every gauge, while
``λ_max(H_θ) = h s²·max_a(σ₁(B_a)² + σ₁(A_a)²)``, at least ``2h s²·σ₁(B_a A_a)`` (reached by the
balanced gauge ``BᵀB = AAᵀ``) and unbounded above (``S = c·I``, ``c → ∞``).

* :func:`regauge_` applies ``B ← B S, A ← S⁻¹ A`` to every (chosen) adapter in place, with a
  diagonal ``S`` (given scales) or a random well-conditioned one (``S = U diag(σ) Vᵀ``, ``U, V``
  random orthogonal, ``log σ`` uniform in ``±½ log κ``, from a generator seeded with ``seed``:
  never the global RNG), and returns a :class:`Gauge` whose :meth:`Gauge.restore` puts the saved
  factors back bitwise; :func:`regauged` is the context manager. Adapters with a ``variant``
  (PEFT's DoRA, a LoRA bias) are refused: their function is not ``W0 + s·BA``.
* :func:`lora_gauge` reports, at the current weights and (``transform=``) after a gauge transform,
  the loss, ``λ_max`` (Lanczos, :mod:`.hessian`) and the one-step SAM sharpness
  ``L(w + ε) − L(w)``, ``ε = ρ·g/‖g‖``, in factor space and in effective-weight space. Like every
  diagnostic it never writes the model: the transformed factors are substituted, the effective
  weights are the LoRA layers' base weights substituted through :func:`torch.func.functional_call`
  (``∂/∂D`` at ``D = 0`` is ``∂/∂W0``), and ``requires_grad`` flags stay as they are.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core.kernels import is_sharded
from ..core.validation import check, check_nonnegative, check_positive, is_int, is_real
from ..lora.protocol import LoRALayer, LowRankAdapter, require_lora_layers
from .hessian.eigenvalues import lanczos_top
from .hessian.krylov import BOUNDS
from .hessian.operator import METHODS, CurvatureOperator
from .objective import LossFn, Objective
from .sharpness import Result, ascend

Scales = float | Sequence[float] | Tensor
#: What :func:`lora_gauge` accepts as ``transform``: None, diagonal scales, or ``"random"``.
Transform = str | float | Sequence[float] | Tensor | None


# -- the transform ---------------------------------------------------------------------------


@dataclass(eq=False)
class AdapterGauge:
    """The gauge matrix of one adapter: ``B ← B S``, ``A ← S⁻¹ A`` (float64, on the CPU)."""

    layer: str          #: the LoRA layer's qualified name in the model
    adapter: str        #: the adapter's name
    rows: slice         #: the output rows it covers
    S: Tensor
    S_inv: Tensor

    @property
    def condition(self) -> float:
        """``cond₂(S)``."""
        return float(torch.linalg.cond(self.S))


@dataclass(eq=False)
class Gauge:
    """What :func:`regauge_` did: one :class:`AdapterGauge` per adapter, and the factors as they
    were, so that :meth:`restore` puts them back bitwise."""

    adapters: list[AdapterGauge]
    _saved: list[tuple[Tensor, Tensor, Tensor, Tensor]] = field(default_factory=list, repr=False)
    restored: bool = False

    @property
    def condition(self) -> float:
        """The largest ``cond₂(S)`` over the adapters."""
        return max(g.condition for g in self.adapters)

    def restore(self) -> None:
        """Put every transformed factor back exactly as it was (once)."""
        check("restore", not self.restored, "a second call", "one restore per gauge transform")
        with torch.no_grad():
            for a, b, a0, b0 in self._saved:
                a.copy_(a0)
                b.copy_(b0)
        self.restored = True


def _work_dtype(t: Tensor) -> torch.dtype:
    """float64 for the products (the result is rounded once, to the factors' dtype)."""
    return torch.float32 if t.device.type == "mps" else torch.float64


def _adapters(model: nn.Module, adapter: str | None, what: str) -> list[tuple[LoRALayer, LowRankAdapter]]:
    """The adapters called ``adapter`` (None: the active ones) of every LoRA layer, refusing variants."""
    check("adapter", adapter is None or isinstance(adapter, str), adapter, "None or an adapter name")
    layers = require_lora_layers(model, what)
    chosen = [(layer, a) for layer in layers for a in layer.named(adapter)]
    known = sorted({a.name for layer in layers for a in layer.adapters})
    check("adapter", bool(chosen), adapter, f"one of {', '.join(known)}" if adapter else "some active adapter")
    for layer, a in chosen:
        check("model", a.variant is None, f"adapter {a.name!r} of {layer.name or 'the model'} is {a.variant}",
              f"adapters computing W0 + s·BA ({what} refuses LoRA variants)")
        check("model", not (is_sharded(a.a) or is_sharded(a.b)), f"a sharded factor in {layer.name}",
              f"whole (unsharded) LoRA factors for {what}")
    ids = [id(t) for _, a in chosen for t in (a.a, a.b)]
    check("model", len(ids) == len(set(ids)), "a factor shared by two adapters", "a tensor per factor")
    return chosen


def _random_gauge(r: int, condition: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    def orthogonal() -> Tensor:
        q, t = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(t))  # Haar-distributed

    u, v = orthogonal(), orthogonal()
    half = 0.5 * math.log(condition)
    log_sigma = torch.rand(r, generator=gen, dtype=torch.float64) * 2 * half - half
    return (u * log_sigma.exp()) @ v.T, (v * (-log_sigma).exp()) @ u.T


def _check_scales(scales: Scales) -> Tensor:
    if isinstance(scales, Tensor):
        scales = scales.detach().cpu().tolist()
    if is_real(scales):
        values = torch.tensor([float(scales)], dtype=torch.float64)
    else:
        ok = isinstance(scales, (list, tuple)) and len(scales) > 0 and all(is_real(c) for c in scales)
        check("scales", ok, scales, "a number or a 1-D sequence of r finite numbers (the diagonal of S)")
        values = torch.tensor([float(c) for c in scales], dtype=torch.float64)
    check("scales", bool((values != 0).all()) and bool(values.isfinite().all()), scales,
          "nonzero finite numbers (S must be invertible)")
    return values


def _plan(model: nn.Module, scales: Scales | None, seed: int | None, condition: float,
          adapter: str | None, what: str) -> list[tuple[LowRankAdapter, AdapterGauge]]:
    """One gauge matrix per chosen adapter, in model order (the random ones drawn in that order)."""
    check("scales", (scales is None) != (seed is None), "scales and seed" if scales is not None else "neither",
          "exactly one of scales (a diagonal S) and seed (a random S)")
    check("seed", seed is None or is_int(seed), seed, "None or an int")
    check("condition", is_real(condition) and condition >= 1, condition, "a finite number >= 1 (cond₂ of a random S)")
    diagonal = None if scales is None else _check_scales(scales)
    chosen = _adapters(model, adapter, what)
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    out = []
    for layer, a in chosen:
        r = a.rank()
        if diagonal is None:
            S, S_inv = _random_gauge(r, float(condition), gen)
        else:
            check("scales", len(diagonal) in (1, r), len(diagonal), f"1 or r = {r} scales ({layer.name}, {a.name!r})")
            d = diagonal.expand(r)
            S, S_inv = torch.diag(d), torch.diag(1.0 / d)
        out.append((a, AdapterGauge(layer.name, a.name, a.rows, S, S_inv)))
    return out


def gauged_factors(adapter: LowRankAdapter, S: Tensor, S_inv: Tensor) -> tuple[Tensor, Tensor]:
    """``(a', b')``: the adapter's tensors for ``B' = B S`` and ``A' = S⁻¹ A`` (new tensors, shaped
    and typed like ``a`` and ``b``; formed in float64 and rounded once)."""
    a, b = adapter.a.detach(), adapter.b.detach()
    work = _work_dtype(a)
    B, A = adapter.matrices(a, b, dtype=work)
    B2 = B @ S.to(device=B.device, dtype=work)
    A2 = S_inv.to(device=A.device, dtype=work) @ A
    if adapter.layout == "embedding":  # matrices() are (aᵀ, bᵀ)
        return B2.T.to(a.dtype).reshape(a.shape), A2.T.to(b.dtype).reshape(b.shape)
    return A2.to(a.dtype).reshape(a.shape), B2.to(b.dtype).reshape(b.shape)


def regauge_(model: nn.Module, scales: Scales | None = None, *, seed: int | None = None,
             condition: float = 10.0, adapter: str | None = None) -> Gauge:
    """Apply the LoRA gauge transform ``B ← B S``, ``A ← S⁻¹ A`` to every adapter called ``adapter``
    (None: every active one) of every LoRA layer of ``model``, in place; ``ΔW = s·BA`` and the
    model's function are unchanged up to rounding (module docstring; Hu et al. 2021; the scaling
    symmetry: cf. BAR, Li et al. 2024).

    ``S`` is ``diag(scales)`` (a number: ``c·I``; or ``r`` nonzero numbers), or, with ``seed``, a
    random ``S = U diag(σ) Vᵀ`` per adapter with ``cond₂(S) ≤ condition`` (``condition=1``: a random
    orthogonal ``S``, which leaves factor-space curvature unchanged too), drawn from a generator of
    its own. Returns the :class:`Gauge`; ``gauge.restore()`` undoes it bitwise. Adapters with a
    ``variant`` are refused (ValueError, before anything is written).
    """
    plan = _plan(model, scales, seed, condition, adapter, "regauge_")
    new = [gauged_factors(a, g.S, g.S_inv) for a, g in plan]  # all formed before any is written
    saved = [(a.a, a.b, a.a.detach().clone(), a.b.detach().clone()) for a, _ in plan]
    with torch.no_grad():
        for (a, _), (a2, b2) in zip(plan, new):
            a.a.copy_(a2)
            a.b.copy_(b2)
    return Gauge([g for _, g in plan], saved)


@contextlib.contextmanager
def regauged(model: nn.Module, scales: Scales | None = None, *, seed: int | None = None,
             condition: float = 10.0, adapter: str | None = None) -> Iterator[Gauge]:
    """:func:`regauge_` for the ``with`` block; the factors are restored bitwise on leaving it (also
    on an error)."""
    gauge = regauge_(model, scales, seed=seed, condition=condition, adapter=adapter)
    try:
        yield gauge
    finally:
        gauge.restore()


# -- the diagnostic --------------------------------------------------------------------------


@dataclass
class GaugePoint(Result):
    """The quantities at one gauge: the loss, ``λ_max`` of the Hessian and the one-step SAM
    sharpness ``L(w + ρ·g/‖g‖) − L(w)``, w.r.t. the LoRA factors and w.r.t. the effective weights."""

    loss: float
    factor_lambda_max: float
    effective_lambda_max: float
    factor_sharpness: float
    effective_sharpness: float
    factor_converged: bool       #: Lanczos met ``tol`` in factor space
    effective_converged: bool    #: ... and in effective-weight space


QUANTITIES = ("loss", "factor_lambda_max", "effective_lambda_max", "factor_sharpness", "effective_sharpness")


@dataclass
class LoRAGauge(Result):
    """:func:`lora_gauge`'s report: ``before`` (the model as it is) and ``after`` the gauge
    transform (None without ``transform``)."""

    before: GaugePoint
    after: GaugePoint | None
    rho: float
    transform: str               #: ``"none"``, ``"diagonal"`` or ``"random"``
    condition: float | None   #: the largest ``cond₂(S)`` of the transform
    factor_numel: int            #: the number of LoRA factor entries
    effective_numel: int         #: the number of effective-weight entries (the LoRA layers' weights)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["before"] = self.before.to_dict()
        out["after"] = None if self.after is None else self.after.to_dict()
        return out

    def change(self, quantity: str) -> float:
        """``(after − before)/|before|`` of ``quantity`` (one of :data:`QUANTITIES`)."""
        check("quantity", quantity in QUANTITIES, quantity, f"one of {', '.join(QUANTITIES)}")
        check("after", self.after is not None, None, "a report made with a transform")
        b, a = getattr(self.before, quantity), getattr(self.after, quantity)
        return (a - b) / abs(b) if b else (0.0 if a == b else math.inf)


class _Held(Objective):
    """The objective at other values of its parameters (``point``) with further parameters held
    at given values (``held``, qualified name → tensor): both substituted, the model not written."""

    def __init__(self, *args, point: list[Tensor] | None = None, held: dict[str, Tensor] | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._at, self._held = point, dict(held or {})

    def point(self) -> list[Tensor]:
        return super().point() if self._at is None else list(self._at)

    def evaluate(self, fn, values, batch, buffers=None):
        return super().evaluate(fn, values, batch, {**self._held, **(buffers or {})})


def _measure(objective: Objective, rho: float, tol: float, bound: str, max_iter: int | None,
             method: str) -> tuple[float, float, float, bool]:
    """``(loss, λ_max, one-step SAM sharpness, converged)`` of ``objective`` at its point."""
    op = CurvatureOperator(objective, "hessian", method)
    with objective.session():
        try:
            top = lanczos_top(op, 1, "LA", tol, max_iter, None, False, bound)
        finally:
            op.release()
    run = ascend(objective, rho, 2.0, 1, rho, [None] * len(objective.params))
    return run.clean, float(top.values[0]), run.path[-1] - run.clean, bool(top.converged[0])


def lora_gauge(model: nn.Module, loss_fn: LossFn, data: Any, rho: float = 0.05, *, transform: Transform = None,
               condition: float = 10.0, adapter: str | None = None, tol: float = 1e-3,
               bound: str = "eigenvalue", max_iter: int | None = None, mode: str = "eval", seed: int = 0,
               method: str = "auto", distributed: bool | None = None) -> LoRAGauge:
    """Curvature of ``loss_fn(model, ·)`` on ``data`` in LoRA factor space and in effective-weight
    space, at the current weights and after the gauge transform ``B ← B S, A ← S⁻¹ A`` (module
    docstring; Hu et al. 2021; the scaling symmetry: cf. BAR, Li et al. 2024).

    Factor space: the factors ``A, B`` of the adapters called ``adapter`` (None: the active ones).
    Effective-weight space: ``D`` in ``L(W0 + D + s·BA)`` at ``D = 0`` for the weights of the LoRA
    layers holding them (the Hessian there is ``H_W``). In each space: ``λ_max`` by Lanczos
    (:func:`~flatminima.diagnostics.top_eigenvalues` with ``k=1``: ``tol``, ``bound``, ``max_iter``,
    ``method``, ``seed``) and the one-step SAM sharpness ``L(w + ε) − L(w)``, ``ε = ρ·g/‖g‖``, at
    the same ``rho`` (Foret et al. 2021; may be negative for a large ``rho``).

    ``transform``: None (the current weights only), a number or ``r`` numbers (``S = diag``), or
    ``"random"`` (a random ``S`` with ``cond₂(S) ≤ condition`` seeded with ``seed``): the same
    ``S`` as :func:`regauge_` with those arguments. The transformed factors are substituted, never
    written. The loss and the effective-weight quantities agree before and after (up to rounding
    and ``tol``); the factor-space ones move. ``mode``, ``distributed``: as in every diagnostic.
    """
    rho = check_nonnegative("rho", rho)
    tol = check_positive("tol", tol)
    check("bound", bound in BOUNDS, bound, "'eigenvalue' or 'residual'")
    check("method", method in METHODS, method, f"one of {', '.join(METHODS)}")
    check("max_iter", max_iter is None or (is_int(max_iter) and max_iter >= 1), max_iter, "None or an int >= 1")
    random = isinstance(transform, str)
    check("transform", transform == "random" if random else True, transform,
          "None, 'random', a number or a sequence of r numbers (the diagonal of S)")
    chosen = _adapters(model, adapter, "lora_gauge")
    factors = [t for _, a in chosen for t in (a.a, a.b)]
    bases = list({id(layer.weight): layer.weight for layer, _ in chosen}.values())
    args = (model, loss_fn, data)
    kwargs = {"mode": mode, "seed": seed, "distributed": distributed}
    plan = None
    if transform is not None:
        plan = _plan(model, None if random else transform, seed if random else None, condition, adapter,
                     "lora_gauge")

    before = (_Held(*args, factors, **kwargs), _Held(*args, bases, **kwargs))
    names = {id(p): n for n, p in before[0].model.named_parameters()}
    check("model", all(id(t) in names for t in factors + bases), type(model).__name__,
          "LoRA factors and base weights that are parameters of the model")
    runs = [before]
    if plan is not None:
        new = {}
        for a, g in plan:
            a2, b2 = gauged_factors(a, g.S, g.S_inv)
            new.update({id(a.a): a2, id(a.b): b2})
        runs.append((_Held(*args, factors, point=[new[id(p)] for p in before[0].params], **kwargs),
                     _Held(*args, bases, held={names[i]: t for i, t in new.items()}, **kwargs)))

    points = []
    for factor, effective in runs:
        loss, f_lam, f_sharp, f_ok = _measure(factor, rho, tol, bound, max_iter, method)
        _, e_lam, e_sharp, e_ok = _measure(effective, rho, tol, bound, max_iter, method)
        points.append(GaugePoint(loss, f_lam, e_lam, f_sharp, e_sharp, f_ok, e_ok))
    label = "none" if plan is None else "random" if random else "diagonal"
    return LoRAGauge(points[0], points[1] if plan is not None else None, rho, label,
                     None if plan is None else max(g.condition for _, g in plan),
                     sum(t.numel() for t in factors), sum(t.numel() for t in bases))
