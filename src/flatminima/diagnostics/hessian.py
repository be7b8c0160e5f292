"""Curvature of the objective: Hessian-vector products, top eigenvalues (Lanczos, power iteration),
trace (Hutchinson) and spectral density (stochastic Lanczos quadrature), for the chosen parameters,
per block, for the LoRA factors, and per evaluation batch (DESIGN.md §10).

``L(w) = Σ_B |B|·L_B(w) / Σ_B |B|`` is the objective of :mod:`.objective`, ``w`` the ``n`` chosen
parameters, and ``C`` the curvature matrix (``curvature=``):

* ``"hessian"``: ``H = ∇²L(w)``;
* ``"ggn"``: the generalized Gauss-Newton ``G = Σ_B |B|/N · J_Bᵀ Q_B J_B`` (Schraudolph 2002;
  Martens 2020), ``J_B = ∂f/∂w`` the Jacobian of the outputs ``f = outputs_fn(model, B)`` and
  ``Q_B = ∇²_f criterion(f, B)``: positive semi-definite for a convex criterion (cross-entropy,
  MSE). It needs the loss split as ``loss = criterion(outputs_fn(model, B), B)``; ``outputs_fn``
  returns one tensor (the logits);
* ``"fisher"``: the empirical Fisher ``F = (1/N) Σ_i ∇ℓ_i ∇ℓ_iᵀ`` from true per-sample gradients
  (not the batch-gradient approximation ``∇L ∇Lᵀ``): ``ℓ_i = loss_fn(model, sample i)`` with each
  sample evaluated as a batch of one (``torch.func.vmap`` in eval mode, a loop in train mode or
  where vmap fails), and ``F_B v = J_ℓᵀ J_ℓ v / |B|`` with ``J_ℓ`` the Jacobian of the per-sample
  losses, so no per-sample gradient is ever stored. Per-sample evaluation puts a train-mode BatchNorm on one
  sample's statistics: use ``mode="eval"`` (the default) for BatchNorm models.

Every product is a Jacobian-vector product of a gradient map, ``method=``:

* ``"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad`` (Pearlmutter 1994);
* ``"double_backward"``: ``∂/∂w ⟨∇L(w), v⟩`` by autograd with ``create_graph`` (PyHessian's product).
  On a single batch the first-order graph is built once and kept for the whole run (its memory is
  held until the run ends), so each product costs one backward pass through it (no forward);
* ``"finite_difference"``: ``(∇L(w + hv) − ∇L(w − hv)) / 2h`` with ``h = ε^{1/3}(1 + ‖w‖)/‖v‖``
  (central differences, error ``O(h²)``; ε the machine epsilon of the parameters), for models whose
  kernels have no second derivative at all. Both second-order methods trust the autograd graph: a
  custom ``autograd.Function`` whose backward is not itself differentiable (``@once_differentiable``)
  gives silently wrong products with either, where finite differences need first derivatives only;
* ``"auto"``: the first that runs, detected on the first product and remembered (per objective):
  for the Hessian double backward, then forward-over-reverse, then finite differences. Double
  backward comes first because it is the cheaper product in PyTorch, unlike in JAX (measured,
  ResNet-18 at batch 128 on an H100: 41 ms, 33 ms through the kept graph, against 52–107 ms for
  forward-over-reverse; 1.3–8× cheaper on CPU); forward-over-reverse covers ops with a forward-mode
  rule but no double backward. GGN and Fisher products try forward mode first (one ``jvp``).
  Second-order methods run with ``scaled_dot_product_attention`` on its math backend, since the
  fused kernels (flash, memory-efficient) have neither forward-mode nor double-backward formulas.

Over several batches ``Cv = Σ_B |B|·C_B v / Σ_B |B|`` (the batch-size-weighted mean), over the
batches of every rank under ``torch.distributed`` (``distributed``, :mod:`.objective`: each product
is all-reduced, so every rank runs the algorithm on the whole data's operator). Nothing is
written to the model: parameters are substituted (:class:`~.objective.Objective`), random vectors come
from a ``torch.Generator`` seeded with ``seed``, and the global RNG state and module modes are put
back. A model whose embedding has a ``padding_idx`` that occurs in the data has a non-symmetric
"Hessian" (autograd zeroes that row of the gradient): forward-over-reverse then returns ``Jv`` and
double backward ``Jᵀv`` of that gradient map.

Algorithms (matrix-free, one product ``Cv`` per step; PyHessian, Yao et al. 2020, uses the same
products with power iteration, Hutchinson and SLQ):

* **Lanczos** (Lanczos 1950; Golub & Van Loan 2013, §10.1) with full reorthogonalization
  (classical Gram-Schmidt twice, "twice is enough": Giraud et al. 2005): the float64 tridiagonal
  ``T_m`` gives Ritz values ``θ_i`` and vectors ``s_i`` with residuals
  ``r_i = ‖C y_i − θ_i y_i‖ = |β_m s_{m,i}|`` (Parlett 1998, §13.2). The eigenvalue error is at most
  ``r_i`` (Bauer–Fike for symmetric ``C``) and, once ``θ_i`` is separated from the rest of the
  spectrum by a gap ``γ_i``, at most ``r_i²/γ_i`` (Kato–Temple; Parlett 1998, Thm. 11.7.1): the
  eigenvalue converges with the square of the residual. ``bound="eigenvalue"`` (default) stops when
  ``min(r_i, r_i²/γ̂_i) ≤ tol·|θ_i|`` with ``γ̂_i`` the distance to the nearest other Ritz value
  (an estimate of the gap: the accuracy the eigenvalue needs, not its vector);
  ``bound="residual"`` stops when ``r_i ≤ tol·|θ_i|`` (a guarantee, and an accurate eigenvector
  too, at the price of more products). Memory: ``max_vectors`` caps the basis vectors on the
  device; with ``offload`` (default on a GPU) older ones move to host memory and are read there
  during reorthogonalization (no restart: plain Lanczos convergence); without (default on the CPU,
  where host memory is the device's) the basis is capped by thick restarts (Wu & Simon 2000).
* **Power iteration** with deflation (each eigenvector found is projected out), stopped by the same
  residual test ``‖Cv − λv‖ ≤ tol·|λ|``; it finds eigenvalues of largest magnitude.
* **Hutchinson** (1989): ``tr(C) ≈ (1/m) Σ_j z_jᵀ C z_j`` with Rademacher ``z_j``, standard error
  ``std/√m``; stops when ``stderr ≤ rtol·|estimate|`` (after ``min_probes``) or at ``probes``.
* **Stochastic Lanczos quadrature** (Golub & Meurant 1994; Ubaru, Chen & Saad 2017; Ghorbani,
  Krishnan & Xiao 2019): for each unit Rademacher probe ``v``, ``m`` Lanczos steps give nodes
  ``θ_i`` and weights ``τ_i = s_{1,i}²`` (``Σ τ_i = 1``, ``Σ τ_i θ_i = vᵀCv``); the density is
  ``φ(t) = (1/P) Σ_p Σ_i τ_{p,i} N(t; θ_{p,i}, σ²)``, which integrates to 1.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .._functional import TINY, reduction_dtype
from ..validation import check, check_int, check_nonnegative, check_positive
from .objective import LossFn, Objective, ParamSpec, batch_size, is_batch, iter_batches, select_params
from .sharpness import Result

CURVATURES = ("hessian", "ggn", "fisher")
METHODS = ("auto", "forward_over_reverse", "double_backward", "finite_difference")
WHICH = ("LA", "LM")
_FOR, _DB, _FD = METHODS[1:]
OutputsFn = Callable[[nn.Module, Any], Tensor]
Criterion = Callable[[Tensor, Any], Tensor]
BlockSpec = Union[None, str, Mapping[str, ParamSpec]]

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
    from torch.nn.attention import SDPBackend, sdpa_kernel
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
    """``v ↦ Cv`` for the curvature ``C`` (``"hessian"``, ``"ggn"`` or ``"fisher"``, module
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
    """``Cv`` (``C`` the Hessian by default, see the module docstring) at the objective's point, on
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


# --------------------------------------------------------------------------------------------
# Flat vectors and the Krylov basis


class _Flat:
    """Vectors over the chosen parameters as one flat tensor (float32, or float64 when a parameter
    is float64): the basis algebra is then one kernel per vector, whatever the parameter count."""

    def __init__(self, params: Sequence[Tensor]):
        self.params = list(params)
        self.numels = [p.numel() for p in self.params]
        self.n = sum(self.numels)
        self.device = self.params[0].device
        self.dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32

    def split(self, x: Tensor) -> list[Tensor]:
        return [c.view(p.shape).to(device=p.device, dtype=p.dtype) for c, p in zip(x.split(self.numels), self.params)]

    def cat(self, tensors: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1).to(device=self.device, dtype=self.dtype) for t in tensors])

    def operator(self, op: CurvatureOperator) -> Callable[[Tensor], Tensor]:
        return lambda x: self.cat(op(self.split(x)))

    def gaussian(self, gen: torch.Generator) -> Tensor:
        return torch.randn(self.n, generator=gen, device=self.device, dtype=self.dtype)

    def rademacher(self, gen: torch.Generator) -> Tensor:
        return torch.randint(0, 2, (self.n,), generator=gen, device=self.device).to(self.dtype).mul_(2).sub_(1)


class _Basis:
    """Orthonormal Lanczos vectors ``q_1 … q_j``: the newest ``max_vectors`` on the compute device,
    older ones in host memory. Projections read the host part on the host (one copy of ``w`` there
    and one correction back per pass), so the device never holds more than ``max_vectors`` of them;
    ``peak`` records the most it held."""

    def __init__(self, max_vectors: Optional[int]):
        self.limit = max_vectors
        self.on_device: list[Tensor] = []
        self.on_host: list[Tensor] = []
        self.peak = 0

    def __len__(self) -> int:
        return len(self.on_host) + len(self.on_device)

    def append(self, q: Tensor) -> None:
        self.on_device.append(q)
        if self.limit is not None and len(self.on_device) > self.limit:
            self.on_host.append(self.on_device.pop(0).to("cpu"))
        self.peak = max(self.peak, len(self.on_device))

    def project_out(self, w: Tensor) -> list[float]:
        """``w ← w − Q Qᵀw`` in place (classical Gram-Schmidt); returns ``Qᵀw``, oldest first."""
        host_c: list[float] = []
        if self.on_host:
            wh = w.to("cpu")
            host_c = [float(torch.dot(q, wh)) for q in self.on_host]
            correction = torch.zeros_like(wh)
            for q, c in zip(self.on_host, host_c):
                correction.add_(q, alpha=c)
        dev_c = torch.stack([torch.dot(q, w) for q in self.on_device]).tolist() if self.on_device else []
        for q, c in zip(self.on_device, dev_c):
            w.add_(q, alpha=-c)
        if self.on_host:
            w.sub_(correction.to(w.device))
        return host_c + dev_c

    def combine(self, s: np.ndarray) -> Tensor:
        """``Q s``."""
        s = [float(x) for x in s]
        k = len(self.on_host)
        out = torch.zeros_like(self.on_device[0])
        for q, c in zip(self.on_device, s[k:]):
            out.add_(q, alpha=c)
        if self.on_host:
            host = torch.zeros_like(self.on_host[0])
            for q, c in zip(self.on_host, s[:k]):
                host.add_(q, alpha=c)
            out.add_(host.to(out.device))
        return out


def _tridiagonal(alphas: Sequence[float], betas: Sequence[float]) -> np.ndarray:
    T = np.diag(np.asarray(alphas, dtype=np.float64))
    if len(betas):
        off = np.asarray(betas, dtype=np.float64)
        T += np.diag(off, 1) + np.diag(off, -1)
    return T


def _lanczos(matvec: Callable[[Tensor], Tensor], q: Tensor, steps: int, basis: _Basis,
             done: Optional[Callable[[list[float], list[float], float], bool]] = None,
             restart: Optional[Callable[[], Tensor]] = None) -> tuple[list[float], list[float], float]:
    """Lanczos with full reorthogonalization from the unit vector ``q``: at most ``steps`` products.

    Returns the diagonal ``α``, the couplings ``β_1 … β_{m−1}`` of ``T_m`` and the last ``β_m``
    (the residual scale). ``done(α, β, β_m)`` stops early. When ``β`` vanishes the Krylov space is
    invariant (its Ritz values are exact): with ``restart`` a fresh random vector orthogonal to the
    basis continues (``T`` gets a zero coupling), otherwise the run stops.
    """
    alphas: list[float] = []
    betas: list[float] = []
    basis.append(q)
    beta = 0.0
    for j in range(steps):
        w = matvec(q)
        first = basis.project_out(w)
        second = basis.project_out(w)  # CGS twice: orthogonal to working precision
        alphas.append(first[-1] + second[-1])
        beta = float(torch.linalg.vector_norm(w))
        if done is not None and done(alphas, betas, beta):
            break
        if j + 1 == steps:
            break
        scale = max(abs(a) for a in alphas) + max(betas, default=0.0)
        if beta <= 100 * torch.finfo(w.dtype).eps * max(scale, TINY):
            if restart is None or len(basis) >= w.numel():
                beta = 0.0
                break
            w = restart()
            basis.project_out(w)
            basis.project_out(w)
            norm = float(torch.linalg.vector_norm(w))
            if norm <= TINY:
                beta = 0.0
                break
            w.div_(norm)
            beta = 0.0
        else:
            w.div_(beta)
        betas.append(beta)
        basis.append(w)
        q = w
    return alphas, betas, beta


def _wanted(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the ``k`` wanted Ritz values: largest algebraic (LA) or magnitude (LM), in that order."""
    key = -theta if which == "LA" else -np.abs(theta)
    return np.argsort(key, kind="stable")[:k]


BOUNDS = ("eigenvalue", "residual")


def _bounds(theta: np.ndarray, S: np.ndarray, beta: float, idx: np.ndarray, tol: float,
            bound: str = "residual") -> tuple[np.ndarray, np.ndarray]:
    """Residuals ``r_i = |β_m s_{m,i}|`` and the convergence test of the wanted Ritz values against
    ``tol·|θ_i|`` (module docstring: ``r_i``, or ``min(r_i, r_i²/γ̂_i)`` for ``bound="eigenvalue"``;
    near-zero ``θ_i`` are measured against ``√ε·max|θ|`` instead, so that they can converge)."""
    residuals = np.abs(beta * S[-1, idx])
    errors = residuals
    if bound == "eigenvalue" and len(theta) > 1:
        gaps = np.array([np.min(np.abs(np.delete(theta, i) - theta[i])) for i in idx])
        errors = np.minimum(residuals, residuals**2 / np.maximum(gaps, TINY))
    floor = math.sqrt(np.finfo(np.float64).eps) * float(np.max(np.abs(theta)))
    return residuals, errors <= tol * np.maximum(np.abs(theta[idx]), floor)


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class Eigenvalues(Result):
    """Top eigenvalues of the curvature: ``values`` in descending order (algebraic for ``which="LA"``,
    magnitude for ``"LM"`` and for power iteration); ``residuals`` are the residual norms
    ``‖Cy − θy‖`` (Lanczos: ``|β_m s_{m,i}|``) and ``converged`` the stopping test (Lanczos: the chosen bound) against
    ``tol·|θ|``; ``hvps`` the products over the whole data; ``device_vectors`` the most Krylov
    vectors held on the device at once (Lanczos; power iteration keeps ``k + 2``);
    ``eigenvectors`` (when asked) one list of tensors shaped like the parameters per eigenvalue."""

    values: np.ndarray
    converged: np.ndarray
    residuals: np.ndarray
    hvps: int
    iterations: int
    algorithm: str
    method: str
    numel: int
    device_vectors: int = 0
    eigenvectors: Optional[list[list[Tensor]]] = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("eigenvectors")
        return out


@dataclass
class Trace(Result):
    """Hutchinson's estimate of ``tr(C)`` with its standard error ``std(samples)/√probes`` (None for
    one probe); ``samples`` are the ``zᵀCz``."""

    trace: float
    stderr: Optional[float]
    probes: int
    converged: bool
    samples: np.ndarray
    hvps: int
    method: str
    numel: int


@dataclass
class SpectralDensity(Result):
    """Stochastic Lanczos quadrature: ``nodes``/``weights`` are ``(probes, steps)`` arrays (rows
    padded with zero weight when a run ended early, each row's weights sum to 1); ``density`` is
    ``φ`` on ``grid`` (Gaussian width ``sigma``), which integrates to 1."""

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma: float
    hvps: int
    method: str
    numel: int

    @property
    def trace(self) -> float:
        """``n·mean_p Σ_i τ_{p,i} θ_{p,i}``: the SLQ estimate of ``tr(C)`` (each row is ``vᵀCv``)."""
        return float(self.numel * np.mean(np.sum(self.weights * self.nodes, axis=1)))


@dataclass
class BatchEigenvalues(Result):
    """The dominant eigenvalue on each batch on its own (DESIGN.md §10): ``values[b]`` for batch ``b``
    of ``batch_sizes[b]`` samples, by Lanczos."""

    values: np.ndarray
    batch_sizes: np.ndarray
    converged: np.ndarray
    hvps: int
    method: str
    numel: int

    @property
    def median(self) -> float:
        return float(np.median(self.values))

    @property
    def min(self) -> float:
        return float(np.min(self.values))

    @property
    def max(self) -> float:
        return float(np.max(self.values))

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))


# --------------------------------------------------------------------------------------------
# Algorithms on an operator


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _unit(x: Tensor) -> Tensor:
    return x.div_(torch.linalg.vector_norm(x).clamp_min(TINY))


def _thick_restart_lanczos(matvec: Callable[[Tensor], Tensor], q: Tensor, k: int, which: str, m: int, steps: int,
                           done: Callable[[np.ndarray, np.ndarray, float], bool]):
    """Thick-restart Lanczos (Wu & Simon 2000) with at most ``m`` basis vectors: full
    reorthogonalization gives the whole column of ``H = QᵀCQ`` at every step (``CQ = QH + w·e_jᵀ``);
    when the basis is full it is replaced by the ``k`` wanted Ritz vectors (``H = diag θ``) and the
    normalized residual ``w/β``, whose couplings to them (``β·s_{j,i}``) the next products recover.
    Returns ``θ, S, β, products, basis`` of the last Rayleigh–Ritz step (``S`` in that basis)."""
    basis: list[Tensor] = [q]
    H = np.zeros((0, 0))
    used = 0
    while True:
        w = matvec(basis[-1])
        used += 1
        coefficients = np.zeros(len(basis))
        for _ in range(2):  # classical Gram–Schmidt twice
            c = torch.stack([torch.dot(v, w) for v in basis])
            for v, ci in zip(basis, c):
                w.sub_(v, alpha=float(ci))
            coefficients += c.double().cpu().numpy()
        j = len(basis)
        grown = np.zeros((j, j))
        grown[:j - 1, :j - 1] = H
        grown[:, j - 1] = grown[j - 1, :] = coefficients
        H = grown
        beta = float(torch.linalg.vector_norm(w))
        theta, S = np.linalg.eigh(H)
        if done(theta, S, beta) or used >= steps or beta <= TINY:
            return theta, S, beta, used, basis
        if j == m:
            idx = _wanted(theta, k, which)
            ritz = []
            for i in idx:
                y = torch.zeros_like(w)
                for v, s_li in zip(basis, S[:, i]):
                    y.add_(v, alpha=float(s_li))
                ritz.append(y)
            basis = ritz
            H = np.diag(theta[idx])
        basis.append(w.div_(beta))


def _lanczos_top(op: CurvatureOperator, k: int, which: str, tol: float, max_iter: Optional[int],
                 max_vectors: Optional[int], eigenvectors: bool, bound: str = "eigenvalue",
                 offload: Optional[bool] = None) -> Eigenvalues:
    flat = _Flat(op.objective.params)
    check("k", k <= flat.n, k, f"an int <= {flat.n} (the number of chosen parameters)")
    steps = min(flat.n, max(64, 10 * k)) if max_iter is None else min(max_iter, flat.n)
    check("max_iter", steps >= k, max_iter, f"an int >= k = {k}")
    gen = _generator(flat.device, op.objective.seed)
    # With offload, basis vectors beyond max_vectors move to host memory (plain Lanczos). Where the
    # parameters already live in host memory that saves nothing, so there (offload=None on the
    # CPU) the basis is capped by thick restarts instead (_thick_restart_lanczos).
    offload = flat.device.type != "cpu" if offload is None else offload
    thick = max_vectors is not None and not offload and max(max_vectors, k + 2) < flat.n
    if thick:
        steps = max(64, 10 * k) if max_iter is None else max_iter  # restarts may take more than n products

    previous: list[np.ndarray] = []
    stopped = [False]  # stopped by the eigenvalue bound

    def settled_test(theta, S, beta, use_gap):
        idx = _wanted(theta, k, which)
        # The gap estimate needs a Ritz value beyond the wanted ones, and it is only trusted once
        # the wanted Ritz values have also stopped moving (by less than tol since the last step):
        # early on the next Ritz value can sit far below the true λ_{k+1}.
        settled = bool(previous) and np.all(np.abs(theta[idx] - previous[-1]) <= tol * np.abs(theta[idx]))
        previous.append(theta[idx])
        use = bound if use_gap and settled else "residual"
        stopped[0] = bool(_bounds(theta, S, beta, idx, tol, use)[1].all())
        return stopped[0]

    def done(alphas, betas, beta):
        if len(alphas) < k:
            return False
        theta, S = np.linalg.eigh(_tridiagonal(alphas, betas))
        return settled_test(theta, S, beta, len(alphas) > k)

    if thick:
        theta, S, beta, used, basis = _thick_restart_lanczos(
            flat.operator(op), _unit(flat.gaussian(gen)), k, which, max(max_vectors, k + 2), steps,
            lambda theta, S, beta: len(theta) >= k and settled_test(theta, S, beta, len(theta) > k))
        peak = max(max_vectors, k + 2)
    else:
        basis = _Basis(max_vectors)
        alphas, betas, beta = _lanczos(flat.operator(op), _unit(flat.gaussian(gen)), steps, basis, done,
                                       restart=lambda: flat.gaussian(gen))
        used, peak = len(alphas), basis.peak
        theta, S = np.linalg.eigh(_tridiagonal(alphas, betas))
    idx = _wanted(theta, k, which)
    residuals, converged = _bounds(theta, S, beta, idx, tol, "residual")
    converged = converged | stopped[0]
    vectors = None
    if eigenvectors:
        combine = basis.combine if isinstance(basis, _Basis) else lambda s: sum(v * float(c) for v, c in zip(basis, s))
        vectors = [[t.clone() for t in flat.split(_unit(combine(S[:, i])))] for i in idx]
    return Eigenvalues(theta[idx].copy(), converged, residuals, op.products, used, "lanczos", op.method,
                       flat.n, peak, vectors)


def _power(op: CurvatureOperator, k: int, tol: float, max_iter: int, eigenvectors: bool) -> Eigenvalues:
    flat = _Flat(op.objective.params)
    check("k", k <= flat.n, k, f"an int <= {flat.n} (the number of chosen parameters)")
    gen = _generator(flat.device, op.objective.seed)
    matvec = flat.operator(op)
    found: list[Tensor] = []
    values, residuals, converged = [], [], []
    iterations = 0

    def deflate(x: Tensor) -> Tensor:
        for u in found:
            x.sub_(u, alpha=float(torch.dot(u, x)))
        return x

    for _ in range(k):
        v = _unit(deflate(flat.gaussian(gen)))
        lam, res, ok = 0.0, math.inf, False
        for _ in range(max_iter):
            # The residual of the deflated operator P C P (P projects out the eigenvectors found): C v
            # itself keeps a component along them as large as their own residuals.
            w = deflate(matvec(v))
            iterations += 1
            lam = float(torch.dot(v, w))
            res = float(torch.linalg.vector_norm(w - lam * v))
            if res <= tol * abs(lam):
                ok = True
                break
            norm = float(torch.linalg.vector_norm(w))
            if norm <= TINY:  # v is in the null space (after deflation): its eigenvalue is 0
                lam, res, ok = 0.0, 0.0, True
                break
            v = w.div_(norm)
        values.append(lam)
        residuals.append(res)
        converged.append(ok)
        found.append(v)
    vectors = [[t.clone() for t in flat.split(u)] for u in found] if eigenvectors else None
    return Eigenvalues(np.asarray(values), np.asarray(converged), np.asarray(residuals), op.products, iterations,
                       "power", op.method, flat.n, 0, vectors)


def _hutchinson(op: CurvatureOperator, probes: int, rtol: float, min_probes: int) -> Trace:
    flat = _Flat(op.objective.params)
    gen = _generator(flat.device, op.objective.seed)
    matvec = flat.operator(op)
    samples: list[float] = []
    se: Optional[float] = None
    converged = False
    for _ in range(probes):
        z = flat.rademacher(gen)
        samples.append(float(torch.dot(z, matvec(z))))
        m = len(samples)
        if m > 1:
            se = float(np.std(samples, ddof=1) / math.sqrt(m))
            converged = se <= rtol * abs(float(np.mean(samples)))
            if converged and m >= min_probes:
                break
    return Trace(float(np.mean(samples)), se, len(samples), converged, np.asarray(samples), op.products, op.method,
                 flat.n)


def _slq(op: CurvatureOperator, probes: int, steps: int, points: int, sigma: Optional[float],
         max_vectors: Optional[int]) -> SpectralDensity:
    flat = _Flat(op.objective.params)
    steps = min(steps, flat.n)
    gen = _generator(flat.device, op.objective.seed)
    matvec = flat.operator(op)
    nodes = np.zeros((probes, steps))
    weights = np.zeros((probes, steps))
    for p in range(probes):
        v = flat.rademacher(gen).div_(math.sqrt(flat.n))
        alphas, betas, _ = _lanczos(matvec, v, steps, _Basis(max_vectors))
        theta, S = np.linalg.eigh(_tridiagonal(alphas, betas))
        nodes[p, :len(theta)] = theta
        weights[p, :len(theta)] = S[0] ** 2
    live = nodes[weights > 0]
    lo, hi = float(live.min()), float(live.max())
    if sigma is None:
        sigma = 0.01 * max(hi - lo, abs(hi), abs(lo), TINY)
    grid = np.linspace(lo - 6 * sigma, hi + 6 * sigma, points)
    kernel = np.exp(-0.5 * ((grid[None, :] - nodes.reshape(-1, 1)) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = (weights.reshape(-1, 1) * kernel).sum(axis=0) / probes
    return SpectralDensity(grid, density, nodes, weights, float(sigma), op.products, op.method, flat.n)


# --------------------------------------------------------------------------------------------
# Public functions


def _check_setup(loss_fn: Optional[LossFn], curvature: str, method: str, outputs_fn, criterion,
                 blocks: BlockSpec) -> Optional[LossFn]:
    """Validates the arguments every public function shares; returns the loss function (from the
    GGN split when ``loss_fn`` is None)."""
    check("curvature", curvature in CURVATURES, curvature, f"one of {', '.join(CURVATURES)}")
    check("method", method in METHODS, method, f"one of {', '.join(METHODS)}")
    check("blocks", blocks is None or blocks == "layer" or isinstance(blocks, Mapping), blocks,
          "None, 'layer' or a dict name -> parameter choice")
    if loss_fn is None and callable(outputs_fn) and callable(criterion):
        def loss_fn(model, batch):
            return criterion(outputs_fn(model, batch), batch)
    check("loss_fn", callable(loss_fn), loss_fn,
          "a callable loss_fn(model, batch) -> scalar tensor (or None with outputs_fn and criterion)")
    return loss_fn


def _blocks(model: nn.Module, chosen: list[Tensor], blocks: BlockSpec) -> list[tuple[Optional[str], list[Tensor]]]:
    """``[(name, parameters)]``: one entry for the whole choice, or one per block, each block cut
    down to the chosen parameters."""
    if blocks is None:
        return [(None, chosen)]
    ids = {id(p) for p in chosen}
    if blocks == "layer":
        out = [(name or "(root)", [p for p in m.parameters(recurse=False) if id(p) in ids])
               for name, m in model.named_modules()]
        return [(n, ps) for n, ps in out if ps]
    out = []
    for name, spec in blocks.items():
        try:
            ps = [p for p in select_params(model, spec)[1] if id(p) in ids]
        except ValueError:
            ps = []
        check("blocks", bool(ps), name, "blocks that each select at least one of the chosen parameters")
        out.append((str(name), ps))
    return out


def _run(model: nn.Module, loss_fn: Optional[LossFn], data: Any, params: ParamSpec, blocks: BlockSpec, mode: str,
         seed: int, curvature: str, method: str, outputs_fn, criterion,
         algorithm: Callable[[CurvatureOperator], Any], distributed: Optional[bool] = None) -> Any:
    loss_fn = _check_setup(loss_fn, curvature, method, outputs_fn, criterion, blocks)
    chosen = Objective(model, loss_fn, data, params, mode, seed, distributed).params
    results = {}
    for name, ps in _blocks(model, chosen, blocks):
        objective = Objective(model, loss_fn, data, ps, mode, seed, distributed)
        op = CurvatureOperator(objective, curvature, method, outputs_fn, criterion)
        with objective.session():
            try:
                results[name] = algorithm(op)
            finally:
                op.release()
    return results[None] if blocks is None else results


def top_eigenvalues(model: nn.Module, loss_fn: Optional[LossFn], data: Any, k: int = 1, *, which: str = "LA",
                    tol: float = 1e-3, bound: str = "eigenvalue", max_iter: Optional[int] = None,
                    max_vectors: Optional[int] = None, offload: Optional[bool] = None,
                    eigenvectors: bool = False, params: ParamSpec = None,
                    blocks: BlockSpec = None, mode: str = "eval", seed: int = 0, curvature: str = "hessian",
                    method: str = "auto", outputs_fn: Optional[OutputsFn] = None,
                    criterion: Optional[Criterion] = None,
                    distributed: Optional[bool] = None) -> Union[Eigenvalues, dict[str, Eigenvalues]]:
    """The ``k`` top eigenvalues of the curvature of ``loss_fn(model, ·)`` on ``data`` by Lanczos with
    full reorthogonalization (module docstring), to relative accuracy ``tol``: of the eigenvalue
    (``bound="eigenvalue"``, the quadratic bound ``r²/γ``) or of the residual (``"residual"``).

    ``which="LA"``: largest algebraic (the sharpest directions); ``"LM"``: largest magnitude (the
    most negative too). ``max_iter``: Lanczos steps (products) at most (default
    ``min(n, max(64, 10k))``); ``max_vectors``: Krylov vectors kept on the device (None: all), older
    ones move to host memory with ``offload`` (default: on a GPU) or the run restarts (module
    docstring). ``params`` chooses the subspace (``"lora"``: the LoRA factors), ``blocks``
    gives per-block results instead (``"layer"``: every module with parameters of its own; or a dict
    name → parameter choice; each block cut down to ``params``) as a dict name → result.
    ``distributed``: reduce every product over the ranks' data (None: when a process group is
    initialized; :mod:`.objective`).
    """
    check_int("k", k, 1)
    check("which", which in WHICH, which, "'LA' (largest algebraic) or 'LM' (largest magnitude)")
    tol = check_positive("tol", tol)
    check("bound", bound in BOUNDS, bound, "'eigenvalue' or 'residual'")
    check("offload", offload is None or isinstance(offload, bool), offload, "None, True or False")
    if max_iter is not None:
        check_int("max_iter", max_iter, k)
    if max_vectors is not None:
        check_int("max_vectors", max_vectors, 1)
    return _run(model, loss_fn, data, params, blocks, mode, seed, curvature, method, outputs_fn, criterion,
                lambda op: _lanczos_top(op, k, which, tol, max_iter, max_vectors, bool(eigenvectors), bound,
                                        offload), distributed)


def power_iteration(model: nn.Module, loss_fn: Optional[LossFn], data: Any, k: int = 1, *, tol: float = 1e-3,
                    max_iter: int = 100, eigenvectors: bool = False, params: ParamSpec = None,
                    blocks: BlockSpec = None, mode: str = "eval", seed: int = 0, curvature: str = "hessian",
                    method: str = "auto", outputs_fn: Optional[OutputsFn] = None,
                    criterion: Optional[Criterion] = None,
                    distributed: Optional[bool] = None) -> Union[Eigenvalues, dict[str, Eigenvalues]]:
    """The ``k`` eigenvalues of largest magnitude by power iteration with deflation: each eigenvalue
    runs until ``‖Cv − λv‖ ≤ tol·|λ|`` or ``max_iter`` products, with the eigenvectors found before
    projected out. Slower than :func:`top_eigenvalues` (the rate is ``|λ_2/λ_1|`` per product);
    kept as the reference algorithm of PyHessian. Arguments as in :func:`top_eigenvalues`."""
    check_int("k", k, 1)
    tol = check_positive("tol", tol)
    check_int("max_iter", max_iter, 1)
    return _run(model, loss_fn, data, params, blocks, mode, seed, curvature, method, outputs_fn, criterion,
                lambda op: _power(op, k, tol, max_iter, bool(eigenvectors)), distributed)


def hessian_trace(model: nn.Module, loss_fn: Optional[LossFn], data: Any, *, probes: int = 100,
                  rtol: float = 1e-2, min_probes: int = 10, params: ParamSpec = None, blocks: BlockSpec = None,
                  mode: str = "eval", seed: int = 0, curvature: str = "hessian", method: str = "auto",
                  outputs_fn: Optional[OutputsFn] = None,
                  criterion: Optional[Criterion] = None,
                  distributed: Optional[bool] = None) -> Union[Trace, dict[str, Trace]]:
    """``tr(C)`` by Hutchinson's estimator with Rademacher probes: at most ``probes`` of them,
    stopping once ``stderr ≤ rtol·|estimate|`` after at least ``min_probes``. Arguments as in
    :func:`top_eigenvalues`."""
    check_int("probes", probes, 1)
    check_nonnegative("rtol", rtol)
    check_int("min_probes", min_probes, 1)
    return _run(model, loss_fn, data, params, blocks, mode, seed, curvature, method, outputs_fn, criterion,
                lambda op: _hutchinson(op, probes, float(rtol), min(min_probes, probes)), distributed)


def spectral_density(model: nn.Module, loss_fn: Optional[LossFn], data: Any, *, probes: int = 4, steps: int = 64,
                     points: int = 1000, sigma: Optional[float] = None, max_vectors: Optional[int] = None,
                     params: ParamSpec = None, blocks: BlockSpec = None, mode: str = "eval", seed: int = 0,
                     curvature: str = "hessian", method: str = "auto", outputs_fn: Optional[OutputsFn] = None,
                     criterion: Optional[Criterion] = None,
                     distributed: Optional[bool] = None) -> Union[SpectralDensity, dict[str, SpectralDensity]]:
    """The spectral density of ``C`` by stochastic Lanczos quadrature: ``probes`` Rademacher probes,
    ``steps`` Lanczos steps each (``probes × steps`` products), Gaussian broadening ``sigma``
    (default 1% of the spectrum's span) on ``points`` grid points spanning the nodes ± 6σ. Arguments
    as in :func:`top_eigenvalues`."""
    check_int("probes", probes, 1)
    check_int("steps", steps, 1)
    check_int("points", points, 2)
    if sigma is not None:
        sigma = check_positive("sigma", sigma)
    if max_vectors is not None:
        check_int("max_vectors", max_vectors, 1)
    return _run(model, loss_fn, data, params, blocks, mode, seed, curvature, method, outputs_fn, criterion,
                lambda op: _slq(op, probes, steps, points, sigma, max_vectors), distributed)


def batch_top_eigenvalues(model: nn.Module, loss_fn: Optional[LossFn], data: Any, *, which: str = "LA",
                          tol: float = 1e-3, max_iter: Optional[int] = None, max_vectors: Optional[int] = None,
                          params: ParamSpec = None, mode: str = "eval", seed: int = 0, curvature: str = "hessian",
                          method: str = "auto", outputs_fn: Optional[OutputsFn] = None,
                          criterion: Optional[Criterion] = None,
                          distributed: Optional[bool] = None) -> BatchEigenvalues:
    """The dominant eigenvalue of the curvature on each batch of ``data`` separately, as a
    distribution (DESIGN.md §10: histogram, median, min, max), by Lanczos (as
    :func:`top_eigenvalues` with ``k=1``, each batch its own objective). Distributed, each batch
    stays a rank's own and the results of every rank are gathered in rank order."""
    check("which", which in WHICH, which, "'LA' (largest algebraic) or 'LM' (largest magnitude)")
    tol = check_positive("tol", tol)
    if max_iter is not None:
        check_int("max_iter", max_iter, 1)
    if max_vectors is not None:
        check_int("max_vectors", max_vectors, 1)
    loss_fn = _check_setup(loss_fn, curvature, method, outputs_fn, criterion, None)
    whole = Objective(model, loss_fn, data, params, mode, seed, distributed)
    chosen = whole.params
    values, sizes, converged = [], [], []
    hvps = 0
    for batch in iter_batches(data):
        objective = Objective(model, loss_fn, batch, chosen, mode, seed, distributed=False)
        op = CurvatureOperator(objective, curvature, method, outputs_fn, criterion)
        with objective.session():
            try:
                result = _lanczos_top(op, 1, which, tol, max_iter, max_vectors, False)
            finally:
                op.release()
        method = result.method  # detected once, then reused for every batch
        values.append(float(result.values[0]))
        converged.append(bool(result.converged[0]))
        sizes.append(batch_size(batch))
        hvps += result.hvps
    rows = whole.gather(list(zip(values, sizes, converged)))
    (hvps,) = whole.sum_floats(hvps)
    values, sizes, converged = ([r[i] for r in rows] for i in range(3))
    return BatchEigenvalues(np.asarray(values), np.asarray(sizes), np.asarray(converged), int(hvps), method,
                            sum(p.numel() for p in chosen))
