"""The curvature operator ``v ↦ Cv`` (Hessian, GGN, empirical Fisher) by three product methods, and :func:`hvp`."""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import _pytree as pytree

from ...core.kernels import TINY, reduction_dtype
from ...core.validation import check
from ..objective import Objective, batch_size, is_batch

CURVATURES = ("hessian", "ggn", "fisher")
METHODS = ("auto", "forward_over_reverse", "double_backward", "finite_difference")
_FOR, _DB, _FD = METHODS[1:]
OutputsFn = Callable[[nn.Module, Any], Tensor]
Criterion = Callable[[Tensor, Any], Tensor]

# The product a method was detected to support, per objective and curvature ("auto" detects once).
_DETECTED: "weakref.WeakKeyDictionary[Objective, dict[str, str]]" = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------------------------
# Small helpers on lists of tensors


def _leaves(values: Sequence[Tensor]) -> list[Tensor]:
    """Fresh autograd leaves sharing the values' storage (the parameters' own flags stay as they are)."""
    return [v.detach().requires_grad_(True) for v in values]


def _grad(outputs: Sequence[Optional[Tensor]], inputs: Sequence[Tensor], cotangents: Sequence[Optional[Tensor]],
          retain_graph: Optional[bool] = None, create_graph: bool = False) -> list[Tensor]:
    """``Σ_k J_kᵀ c_k`` for outputs ``o_k(inputs)``; outputs that do not depend on the inputs (or
    inputs no output depends on) contribute zeros instead of raising."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o is not None and o.requires_grad]
    if not pairs:
        return [torch.zeros_like(x) for x in inputs]
    got = torch.autograd.grad([o for o, _ in pairs], list(inputs), [c for _, c in pairs], retain_graph=retain_graph,
                              create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(got, inputs)]


def _gradient(loss: Callable[[list[Tensor]], Tensor], values: Sequence[Tensor]) -> list[Tensor]:
    leaves = _leaves(values)
    return _grad([loss(leaves)], leaves, [None])


def _norm(tensors: Sequence[Tensor]) -> float:
    """``‖concat(tensors)‖₂`` in float64 (one host sync)."""
    squares = [t.detach().double().square().sum() for t in tensors]
    return math.sqrt(float(torch.stack([s.to(squares[0].device) for s in squares]).sum()))


def _fd_step(values: Sequence[Tensor], v: Sequence[Tensor]) -> float:
    """``h = ε^{1/3}(1 + ‖w‖)/‖v‖``: balances the ``O(h²)`` truncation error of central differences
    against the ``O(ε/h)`` rounding error of the gradients (relative to the weights' scale)."""
    eps = max(torch.finfo(t.dtype).eps for t in values)
    return eps ** (1.0 / 3.0) * (1.0 + _norm(values)) / max(_norm(v), TINY)


def _shift(values: Sequence[Tensor], v: Sequence[Tensor], h: float) -> list[Tensor]:
    return list(torch._foreach_add(list(values), list(v), alpha=h))


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    """``scaled_dot_product_attention`` on its math backend: the only one with second derivatives."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _per_sample(batch: Any) -> tuple[list[Any], Any, list[Optional[int]]]:
    """The batch's leaves, its structure, and the leaves' batch dimension (0 for tensors whose
    leading dimension is the batch size, None for everything else)."""
    n = batch_size(batch)
    leaves, spec = pytree.tree_flatten(batch)
    dims = [0 if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == n else None for x in leaves]
    return leaves, spec, dims


# --------------------------------------------------------------------------------------------
# Curvature-vector products


class CurvatureOperator:
    """``v ↦ Cv`` for the curvature ``C`` (``"hessian"``, ``"ggn"`` or ``"fisher"``, package
    docstring) of ``objective`` over its data, ``v`` a list of tensors shaped like the objective's
    parameters. Call it inside ``objective.session()`` (mode and RNG); :meth:`release` frees the
    first-order graph a single-batch double-backward product keeps.

    ``products`` counts the products over the whole data (``__call__``); ``method`` is the resolved
    product method (None until the first product when ``"auto"``).
    """

    def __init__(self, objective: Objective, curvature: str = "hessian", method: str = "auto",
                 outputs_fn: Optional[OutputsFn] = None, criterion: Optional[Criterion] = None):
        check("curvature", curvature in CURVATURES, curvature, f"one of {', '.join(CURVATURES)}")
        check("method", method in METHODS, method, f"one of {', '.join(METHODS)}")
        if curvature == "ggn":
            check("outputs_fn", callable(outputs_fn), outputs_fn,
                  "a callable outputs_fn(model, batch) -> outputs tensor (curvature='ggn')")
            check("criterion", callable(criterion), criterion,
                  "a callable criterion(outputs, batch) -> scalar loss (curvature='ggn')")
        self.objective, self.curvature, self.requested = objective, curvature, method
        self.criterion = criterion
        data = objective.data
        self.single_batch = is_batch(data) or (isinstance(data, (list, tuple)) and len(data) == 1)
        self._outputs = None
        if curvature == "ggn":
            # The same substitution (mode, seed, clone of buffers) for the outputs as for the loss.
            self._outputs = Objective(objective.model, outputs_fn, data, objective.params, objective.mode,
                                      objective.seed)
        self.method: Optional[str] = method if method != "auto" else _DETECTED.get(objective, {}).get(curvature)
        self.products = 0
        self._graph: Optional[tuple[Any, list[Tensor], list[Tensor]]] = None
        self._vmap_ok = True

    # -- the full operator --------------------------------------------------------------------
    def __call__(self, v: Sequence[Tensor], batches: Optional[Sequence[Any]] = None) -> list[Tensor]:
        """``Cv = Σ_B |B|·C_B v / Σ_B |B|`` over the objective's batches (or ``batches``) and, when
        the objective is distributed, every rank's, accumulated in float32 (float64 for float64
        parameters)."""
        total: Optional[list[Tensor]] = None
        count = 0
        for batch in self.objective.batches() if batches is None else batches:
            n = batch_size(batch)
            hv = [h.detach().to(reduction_dtype(h)) for h in self.batch_product(v, batch)]
            if total is None:
                total = list(torch._foreach_mul(hv, float(n)))
            else:
                torch._foreach_add_(total, hv, alpha=n)
            count += n
        self.objective.all_sum(total)
        (count,) = self.objective.sum_floats(count)
        torch._foreach_div_(total, float(count))
        self.products += 1
        return total

    def release(self) -> None:
        self._graph = None

    # -- one batch ----------------------------------------------------------------------------
    def batch_product(self, v: Sequence[Tensor], batch: Any) -> list[Tensor]:
        """``C_B v`` on one batch (in the parameters' dtypes)."""
        v = [t.to(p.dtype) for t, p in zip(v, self.objective.params)]
        if self.method is not None:
            return self._product(self.method, v, batch)
        errors = []
        for method in (_DB, _FOR, _FD) if self.curvature == "hessian" else (_FOR, _DB, _FD):
            try:
                out = self._product(method, v, batch)
            except (RuntimeError, NotImplementedError) as exc:
                self._graph = None
                errors.append(f"{method}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            self.method = method
            _DETECTED.setdefault(self.objective, {})[self.curvature] = method
            return out
        raise RuntimeError("no curvature-vector product runs on this model and loss:\n  " + "\n  ".join(errors))

    def _product(self, method: str, v: list[Tensor], batch: Any) -> list[Tensor]:
        attention = _math_attention() if method != _FD else contextlib.nullcontext()
        with torch.enable_grad(), attention:
            if self.curvature == "hessian":
                return self._hessian(method, v, batch)
            return self._gauss_newton(method, v, batch)

    def _hessian(self, method: str, v: list[Tensor], batch: Any) -> list[Tensor]:
        objective = self.objective
        w = objective.point()

        def loss(values):
            return objective.loss(list(values), batch)

        if method == _FOR:
            # torch.func differentiates whatever the grad mode; no_grad stops autograd from also
            # recording a graph towards parameters outside the choice that require grad.
            with torch.no_grad():
                return list(torch.func.jvp(torch.func.grad(loss), (tuple(w),), (tuple(v),))[1])
        if method == _DB:
            if self._graph is not None and self._graph[0] is batch:
                _, leaves, grads = self._graph
            else:
                leaves = _leaves(w)
                grads = _grad([loss(leaves)], leaves, [None], create_graph=True)
                if self.single_batch:
                    self._graph = (batch, leaves, grads)
            return _grad(grads, leaves, v, retain_graph=self._graph is not None)
        h = _fd_step(w, v)
        plus, minus = _gradient(loss, _shift(w, v, h)), _gradient(loss, _shift(w, v, -h))
        return list(torch._foreach_div(torch._foreach_sub(plus, minus), 2.0 * h))

    def _gauss_newton(self, method: str, v: list[Tensor], batch: Any) -> list[Tensor]:
        """``J_fᵀ Q J_f v`` for ``f`` the outputs (GGN, ``Q = ∇²criterion``) or the per-sample losses
        (Fisher, ``Q = I/|B|``); ``J_f v`` by ``method``, ``J_fᵀ`` by one backward pass."""
        w = self.objective.point()
        if self.curvature == "ggn":
            def f(values):
                return self._outputs.loss(list(values), batch)

            def Q(out: Tensor, t: Tensor) -> Tensor:
                o = out.detach().requires_grad_(True)
                (g,) = _grad([self.criterion(o, batch)], [o], [None], create_graph=True)
                return _grad([g], [o], [t])[0]
        else:
            def f(values):
                return self._sample_losses(list(values), batch)

            n = batch_size(batch)

            def Q(out: Tensor, t: Tensor) -> Tensor:
                return t / n

        if method == _FOR:
            with torch.no_grad():
                _, jv = torch.func.jvp(lambda *values: f(values), tuple(w), tuple(v))
            leaves = _leaves(w)
            out = f(leaves)
        else:
            leaves = _leaves(w)
            out = f(leaves)
            if method == _DB:
                # J v by the double-vjp trick: J v = ∂/∂z ⟨Jᵀz, v⟩ for a dummy cotangent z.
                z = torch.zeros_like(out, requires_grad=True)
                jtz = _grad([out], leaves, [z], retain_graph=True, create_graph=True)
                jv = _grad(jtz, [z], v)[0]
            else:
                h = _fd_step(w, v)
                with torch.no_grad():
                    jv = (f(_shift(w, v, h)) - f(_shift(w, v, -h))) / (2.0 * h)
        return _grad([out], leaves, [Q(out, jv)])

    def _sample_losses(self, values: list[Tensor], batch: Any) -> Tensor:
        """``(ℓ_1, …, ℓ_n)``: the loss of each sample as a batch of one."""
        objective = self.objective
        leaves, spec, dims = _per_sample(batch)

        def one(*sample):
            parts = [x.unsqueeze(0) if d == 0 else x for x, d in zip(sample, dims)]
            return objective.loss(values, pytree.tree_unflatten(parts, spec))

        # vmap only in eval mode: a train-mode BatchNorm updates its statistics in place, which vmap
        # refuses (and torch.func.hessian, which vmaps over tangents, gets silently wrong), so train
        # mode loops over the samples.
        if self._vmap_ok and not objective.model.training:
            try:
                return torch.func.vmap(one, in_dims=tuple(dims), randomness="same")(*leaves)
            except (RuntimeError, NotImplementedError, ValueError):
                self._vmap_ok = False  # data-dependent control flow, or a module vmap cannot batch
        n = batch_size(batch)
        rows = [[x[i] if d == 0 else x for x, d in zip(leaves, dims)] for i in range(n)]
        return torch.stack([one(*row) for row in rows])


def hvp(objective: Objective, v: Sequence[Tensor], batch: Any = None, *, curvature: str = "hessian",
        method: str = "auto", outputs_fn: Optional[OutputsFn] = None,
        criterion: Optional[Criterion] = None) -> list[Tensor]:
    """``Cv`` (``C`` the Hessian by default, see the package docstring) at the objective's point, on
    ``batch`` or, when None, over all of ``objective.data`` (batch-size-weighted mean; with every
    rank's batch or data when the objective is distributed); ``v`` and the result are lists shaped
    like ``objective.params`` (the result in the parameters' dtypes)."""
    op = CurvatureOperator(objective, curvature, method, outputs_fn, criterion)
    v = list(v)
    check("v", len(v) == len(objective.params) and all(t.shape == p.shape for t, p in zip(v, objective.params)),
          [tuple(t.shape) for t in v], "a list of tensors shaped like the objective's parameters")
    with objective.session():
        try:
            out = op(v, None if batch is None else [batch])
        finally:
            op.release()
    return [t.to(p.dtype) for t, p in zip(out, objective.params)]
