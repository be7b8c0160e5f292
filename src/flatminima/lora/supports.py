"""Where the perturbation lives: the LoRA supports, a scope option for every method.

``fm.SAM(base, scope=fm.lora.support(model, "update"))``, and likewise for any method of the
library, adversarial or random. For a LoRA layer computing with ``W = W0 + s·BA`` (the protocol of
:mod:`flatminima.lora.protocol`), the method's ε is made on the support's tensors, from their values
(for weight-based scales) and their gradients, and the model is put at:

* ``"factors"``: ``(A + ε_A, B + ε_B)``, the LoRA factors moved in place (SAM-LoRA; RWP on A/B);
  with ``radius="effective"`` the factor perturbation is rescaled by ``c`` so that the change of
  the effective weight it makes, ``Δ(c) = c·s(ε_B A + B ε_A) + c²·s·ε_B ε_A`` summed over layers,
  has the Frobenius norm the factor perturbation had (``‖Δ(c)‖_F = ‖ε‖₂``: SAM on the factors at
  ``‖ΔW‖ = ρ``); ``c`` solves that quartic by Newton's method, from Gram matrices of size r × r.
* ``"update"``: ``W0 + (s·BA + ε)``: ε on the update ``ΔW = s·BA`` (its values for weight-based
  scales), with gradient ``∂L/∂W``; the descent gradient reaches the factors through ``ΔW``.
* ``"merged"``: ``(W0 + s·BA) + ε``, ε scaled on the merged weight (Flat-LoRA's point).
* ``"base"``: ``(W0 + ε) + s·BA``, ε scaled on the frozen ``W0``.
* ``"all"``: the trained tensors (factors, head, …) in place and the frozen ``W0`` of every LoRA
  layer, one perturbation over both.

``whole_model=True`` adds every other frozen linear, convolution and embedding layer to ``"merged"``,
``"base"`` and ``"all"`` (their ``W = W0``). For a weight-independent scale (SAM's) ``"update"``,
``"merged"`` and ``"base"`` are the same point: they differ through the scale (ASAM's ``|w|``, RWP's
filter norms). The frozen weights are never written: the layers compute with ``W0 + ε`` functionally
(:mod:`flatminima.lora.functional`), and their gradients are read in the clean pass, which the
method must run (``step(closure)`` or ``TrainStep``) when it follows a gradient.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from ..core import kernels as F
from ..core.ascent import AscentWeightDecay
from ..core.perturb import NoPerturbation, Perturbation, PerturbationContext, Point
from ..core.perturbations import RandomNoise, RankSplit
from ..core.scale import Scale
from ..core.scope import SupportScope
from ..core.state import StateSlot
from ..core.validation import check, check_bool, check_choice
from .functional import functional_weights
from .noise import MergedWeightNoise
from .layers import frozen_layers, lora_parameters
from .protocol import LoRALayer, require_lora_layers

KINDS = ("factors", "update", "merged", "base", "all")
RADII = ("native", "effective")
#: Scale kinds that read the weights' values (the others read only gradients, or nothing).
_WEIGHT_SCALES = ("w", "w_over_g", "w_over_sqrt_n")


def support(model: nn.Module, kind: str = "factors", *, adapter: Optional[str] = None, radius: str = "native",
            whole_model: bool = False) -> "LoRASupport":
    """The support ``kind`` (:data:`KINDS`, see the module docstring) of ``model``'s LoRA layers, to
    pass as ``scope=`` to any method. ``adapter``: the adapter whose factors are moved (default: the
    active ones). ``radius="effective"`` (``"factors"`` only) measures the radius in the effective
    weight. ``whole_model``: every other frozen linear/conv/embedding layer too (not ``"factors"``,
    ``"update"``)."""
    return LoRASupport(model, kind, adapter=adapter, radius=radius, whole_model=whole_model)


SPEC_KEYS = ("kind", "adapter", "radius", "whole_model")


def support_from_spec(model: nn.Module, spec) -> "LoRASupport":
    """The support a configuration names: a kind (``"update"``) or a mapping with ``kind`` and any of
    ``adapter``, ``radius``, ``whole_model`` (the runner's per-method ``support:`` setting)."""
    if isinstance(spec, str):
        spec = {"kind": spec}
    check("support", isinstance(spec, dict) and "kind" in spec and set(spec) <= set(SPEC_KEYS), spec,
          f"a kind ({', '.join(KINDS)}) or a mapping with 'kind' and any of {', '.join(SPEC_KEYS[1:])}")
    return support(model, **spec)


class LoRASupport(SupportScope):
    """A LoRA support (built by :func:`support`); the layers are read when it is built."""

    def __init__(self, model: nn.Module, kind: str, *, adapter: Optional[str], radius: str, whole_model: bool):
        check_choice("kind", kind, KINDS)
        check_choice("radius", radius, RADII)
        check_bool("whole_model", whole_model)
        check("radius", radius == "native" or kind == "factors", radius,
              f"'native' for support {kind!r} (its radius is already measured in the weights it perturbs)")
        check("whole_model", not whole_model or kind in ("merged", "base", "all"), whole_model,
              f"False for support {kind!r} (only 'merged', 'base' and 'all' reach layers without LoRA)")
        self.model, self.kind, self.adapter, self.radius, self.whole_model = model, kind, adapter, radius, whole_model
        self.layers = require_lora_layers(model, f"the support {kind!r}")
        self.factors = lora_parameters(model, adapter)
        self.functional = kind != "factors"
        if self.functional or radius == "effective":
            for layer in self.layers:
                check("model", layer.variant() is None, f"{layer.name}: {layer.variant()}",
                      f"plain LoRA adapters (the support {kind!r} needs the layer's weight W0 + s·BA)")
        self.frozen = frozen_layers(model, whole_model) if self.functional else []
        self.bases = [f.base if isinstance(f, LoRALayer) else f for f in self.frozen]
        for base in self.bases:
            check("model", not base.weight.requires_grad, f"a trainable base weight in {type(base).__name__}",
                  "frozen base weights (the support perturbs them functionally)")
        self._groups = _rows_groups(self.layers, self.factors) if radius == "effective" else None

    def __repr__(self) -> str:
        return (f"LoRASupport({self.kind!r}, {len(self.layers)} LoRA layers, radius={self.radius!r}, "
                f"whole_model={self.whole_model})")

    def parameters(self) -> list[Tensor]:
        if self.kind == "factors":
            return list(self.factors)
        if self.kind == "all":
            return [p for p in self.model.parameters() if p.requires_grad]
        return []

    def wrap(self, perturbation: Perturbation) -> Perturbation:
        if isinstance(perturbation, NoPerturbation) or (not self.functional and self.radius == "native"):
            return perturbation
        check("scope", not isinstance(perturbation, RankSplit), "a LoRA support with parallel m-RWP",
              "parallel=False (its ranks split noisy and clean passes, not supports)")
        check("scope", not isinstance(perturbation, MergedWeightNoise), type(perturbation).__name__,
              "a method that perturbs tensors (Flat-LoRA's noise is already on the merged weight)")
        if self.functional and isinstance(perturbation, RandomNoise):
            check("fisher_eta", perturbation.fisher_eta == 0, perturbation.fisher_eta,
                  f"0 on the support {self.kind!r} (the Fisher EMA needs a descent gradient, which frozen "
                  "weights do not get)")
        return OnSupport(perturbation, self)

    # -- the functional part ----------------------------------------------------------------------
    def values(self, reads_weights: bool) -> list[Tensor]:
        """The functional tensors' values: ``ΔW``, ``W0 + ΔW`` or ``W0`` per frozen layer (a
        one-element view of the right shape where the method never reads them)."""
        out = []
        for f, base in zip(self.frozen, self.bases):
            w = base.weight
            if self.kind in ("base", "all") or not isinstance(f, LoRALayer):
                out.append(w)
            elif not reads_weights:
                out.append(torch.zeros((), dtype=w.dtype, device=w.device).expand(w.shape))
            else:
                out.append(f.delta() if self.kind == "update" else f.merged())
        return out

    def group_index(self, opt) -> list[int]:
        """The optimizer's group of each frozen layer: that of its first factor (0 without one)."""
        where = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
        out = []
        for f in self.frozen:
            tensors = [t for a in f.adapters for t in (a.a, a.b)] if isinstance(f, LoRALayer) else []
            out.append(next((where[id(t)] for t in tensors if id(t) in where), 0))
        return out

    # -- the effective radius ---------------------------------------------------------------------
    def effective_scale(self, eps: list[Tensor], params: list[Tensor]) -> Tensor:
        """``c`` with ``‖Δ(c)‖_F = ‖ε‖₂`` (module docstring), as a 0-dim tensor (no host sync)."""
        index = {id(p): i for i, p in enumerate(params)}
        dtype = torch.float64 if any(e.dtype == torch.float64 for e in eps) else torch.float32
        l2 = lq = q2 = torch.zeros((), dtype=dtype, device=eps[0].device)
        for group in self._groups:
            u_l, v_l, u_q, v_q = [], [], [], []
            for adapter in group:
                ea = eps[index[id(adapter.a)]] if id(adapter.a) in index else torch.zeros_like(adapter.a)
                eb = eps[index[id(adapter.b)]] if id(adapter.b) in index else torch.zeros_like(adapter.b)
                b, a = adapter.matrices(dtype=dtype)
                db, da = adapter.matrices(ea, eb, dtype)
                s = float(adapter.scaling)
                u_l += [s * db, s * b]
                v_l += [a, da]
                u_q.append(s * db)
                v_q.append(da)
            ul, vl, uq, vq = torch.cat(u_l, 1), torch.cat(v_l, 0), torch.cat(u_q, 1), torch.cat(v_q, 0)
            l2 = l2 + ((ul.T @ ul) * (vl @ vl.T)).sum()
            lq = lq + ((ul.T @ uq) * (vl @ vq.T)).sum()
            q2 = q2 + ((uq.T @ uq) * (vq @ vq.T)).sum()
        target = F.global_norm(eps).to(dtype) ** 2
        # f(c) = c²·l2 + 2c³·lq + c⁴·q2 − t²; Newton from the first-order answer c = t/√l2.
        c = torch.where(l2 > 0, torch.sqrt(target / l2.clamp_min(F.TINY)), torch.ones_like(l2))
        for _ in range(12):
            f = c * c * l2 + 2 * c ** 3 * lq + c ** 4 * q2 - target
            df = 2 * c * l2 + 6 * c * c * lq + 4 * c ** 3 * q2
            c = torch.where(df.abs() > 0, c - f / torch.where(df.abs() > 0, df, torch.ones_like(df)), c)
        return torch.where(l2 > 0, c, torch.ones_like(c))


def _rows_groups(layers: list[LoRALayer], factors: list[Tensor]) -> list[list]:
    """The perturbed adapters grouped by (layer, output rows): their changes add up inside a group."""
    moved = {id(t) for t in factors}
    groups = []
    for layer in layers:
        by_rows: dict[tuple, list] = {}
        for adapter in layer.adapters:
            if id(adapter.a) in moved or id(adapter.b) in moved:
                by_rows.setdefault(adapter.rows.indices(layer.rows)[:2], []).append(adapter)
        spans = sorted(by_rows)
        for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
            check("model", e0 <= s1, f"{layer.name}: adapters on overlapping but different rows",
                  "adapters on the same or on disjoint output rows (radius='effective')")
        groups += list(by_rows.values())
    return groups


def _reads_weights(perturbation: Perturbation, ascent) -> bool:
    scale = getattr(perturbation, "scale", None)
    return ((isinstance(scale, Scale) and scale.kind in _WEIGHT_SCALES)
            or any(isinstance(link, AscentWeightDecay) for link in ascent.links))


class _SupportContext(PerturbationContext):
    """The method's view of a step on a support: the support's tensors and their gradients."""

    def __init__(self, parent: PerturbationContext, params, gidx, grads):
        super().__init__(parent.opt, params, gidx, parent.clean_loss)
        self.memo, self.commits, self._grads = parent.memo, parent.commits, grads
        self.reads_next = False

    @property
    def clean_grads(self) -> list[Tensor]:
        return self._grads

    def perturbed(self, last: bool = True, **fields: Any):
        self.reads_next = not last  # the method reads this pass's gradients: capture them
        return super().perturbed(last, **fields)


class _Outcome:
    def __init__(self, outcome, functional: list[Optional[Tensor]], values: list[Tensor]):
        self.loss, self._outcome, self._functional, self._values = outcome.loss, outcome, functional, values

    @property
    def grads(self) -> list[Tensor]:
        extra = [g if g is not None else torch.zeros(v.shape, dtype=v.dtype, device=v.device)
                 for g, v in zip(self._functional, self._values)]
        return self._outcome.grads + extra


def _synced(opt, grads: list[Optional[Tensor]]) -> list[Optional[Tensor]]:
    """The captured gradients averaged over ranks with ``sync_perturbation`` (a shared ε)."""
    dist = torch.distributed
    if opt.sync_perturbation and dist.is_available() and dist.is_initialized():
        for g in grads:
            if g is not None:
                dist.all_reduce(g)
                g.div_(dist.get_world_size())
    return grads


class OnSupport(Perturbation):
    """``inner`` (any method's perturbation) made on a :class:`LoRASupport` (module docstring)."""

    supports_sharded = False

    def __init__(self, inner: Perturbation, support_: LoRASupport):
        self.inner, self.support = inner, support_
        self.needs_clean_pass, self.needs_clean_grad = inner.needs_clean_pass, inner.needs_clean_grad
        self.clean_batch, self.keeps_gradients = inner.clean_batch, inner.keeps_gradients
        self._clean: Optional[list[Optional[Tensor]]] = None
        self._sub: Optional[_SupportContext] = None

    def __repr__(self) -> str:
        return f"OnSupport({self.inner!r}, {self.support!r})"

    @property
    def batch_count(self) -> Optional[int]:
        return self.inner.batch_count

    def check_ascent(self, ascent) -> None:
        self.inner.check_ascent(ascent)
        keeps_state = ascent.stateful or any(isinstance(getattr(link, "slot", None), StateSlot) for link in ascent.links)
        check("ascent", not (keeps_state and self.support.kind in ("update", "merged")), repr(ascent),
              f"an ascent direction without state across steps on the support {self.support.kind!r} "
              "(its tensors are rebuilt every step)")

    def trigger_grads(self, grads: list[Tensor]) -> list[Tensor]:
        return grads + [g for g in (self._clean or []) if g is not None]

    def clean_context(self, opt):
        if not (self.support.functional and self.inner.needs_clean_grad):
            return None
        return self._capture_clean

    @contextlib.contextmanager
    def _capture_clean(self) -> Iterator[None]:
        self._clean = None
        with functional_weights(self.support.bases, capture=True) as grads:
            yield
        self._clean = grads

    def points(self, ctx: PerturbationContext):
        sup, opt = self.support, ctx.opt
        real = list(ctx.params)
        values, gidx, grads = [], [], []
        if sup.functional:
            values, gidx = sup.values(_reads_weights(self.inner, opt.ascent)), sup.group_index(opt)
            if self.needs_clean_grad:
                check("closure", self._clean is not None, "a clean pass run outside the support's capture",
                      "step(closure) or flatminima.TrainStep, which run the clean pass themselves")
                grads = [g if g is not None else torch.zeros(v.shape, dtype=v.dtype, device=v.device)
                         for g, v in zip(_synced(opt, self._clean), values)]
            self._clean = None
        clean = (ctx.clean_grads + grads) if self.needs_clean_grad else []
        sub = self._sub = _SupportContext(ctx, real + values, list(ctx.gidx) + gidx, clean)
        producer = self.inner.points(sub)
        try:
            point = next(producer, None)
            while point is not None:
                capture = sup.functional and point.request.backward and sub.reads_next
                sub.reads_next = False
                eps, later = self._split(point, real)
                captured: list[Optional[Tensor]] = [None] * len(values)
                apply = None
                if sup.functional and (later is not None or capture):
                    apply = self._applier(later, capture, captured)
                outcome = yield Point(point.request, eps, apply)
                point = None
                point = producer.send(_Outcome(outcome, _synced(opt, captured) if capture else captured, values))
        except StopIteration:
            pass
        finally:
            producer.close()

    def finish(self, ctx: PerturbationContext):
        sub, self._sub = self._sub, None
        return self.inner.finish(sub) if sub is not None else None

    def _split(self, point: Point, real: list[Tensor]):
        """``(ε of the in-place tensors, the rest for the functional ones)``."""
        eps, n = point.eps, len(real)
        if eps is None:
            return None, None
        if self.support.radius == "effective":
            eps = list(eps)
            c = self.support.effective_scale(eps, real)
            return [e * c.to(e.dtype) for e in eps], None
        if isinstance(eps, list):
            head, tail = eps[:n], eps[n:]
            eps.clear()  # as the loop does: nothing but the split lists holds ε
            return (head or None), (tail or None)
        iterator = iter(eps)
        return (iterator if n else None), iterator  # the loop takes the first n; the functional part the rest

    def _applier(self, later, capture: bool, captured: list):
        bases = self.support.bases

        @contextlib.contextmanager
        def apply() -> Iterator[None]:
            eps = None if later is None else list(later)
            with functional_weights(bases, eps, capture) as grads:
                yield
            captured[:] = grads

        return apply
