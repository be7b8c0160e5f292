"""Top eigenvalues of the curvature: Lanczos, power iteration, and the dominant eigenvalue per batch."""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from ...core.kernels import TINY
from ...core.validation import check, check_int, check_positive
from ..objective import LossFn, Objective, ParamSpec, batch_size, iter_batches
from .blocks import BlockSpec, _check_setup, _run
from .krylov import (BOUNDS, _Basis, _bounds, _Flat, _generator, _lanczos, _thick_restart_lanczos, _tridiagonal,
                     _unit, _wanted)
from .operator import Criterion, CurvatureOperator, OutputsFn
from .results import BatchEigenvalues, Eigenvalues

WHICH = ("LA", "LM")


def lanczos_top(op: CurvatureOperator, k: int, which: str, tol: float, max_iter: Optional[int],
                max_vectors: Optional[int], eigenvectors: bool, bound: str = "eigenvalue",
                offload: Optional[bool] = None) -> Eigenvalues:
    """The ``k`` extreme eigenvalues (``which``: ``"LA"`` largest, ``"SA"`` smallest, ``"LM"`` largest
    in magnitude) of the curvature operator ``op`` by (thick-restart) Lanczos, to ``tol`` by ``bound``."""
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


# --------------------------------------------------------------------------------------------
# Public functions


def top_eigenvalues(model: nn.Module, loss_fn: Optional[LossFn], data: Any, k: int = 1, *, which: str = "LA",
                    tol: float = 1e-3, bound: str = "eigenvalue", max_iter: Optional[int] = None,
                    max_vectors: Optional[int] = None, offload: Optional[bool] = None,
                    eigenvectors: bool = False, params: ParamSpec = None,
                    blocks: BlockSpec = None, mode: str = "eval", seed: int = 0, curvature: str = "hessian",
                    method: str = "auto", outputs_fn: Optional[OutputsFn] = None,
                    criterion: Optional[Criterion] = None,
                    distributed: Optional[bool] = None) -> Union[Eigenvalues, dict[str, Eigenvalues]]:
    """The ``k`` top eigenvalues of the curvature of ``loss_fn(model, ·)`` on ``data`` by Lanczos with
    full reorthogonalization (package docstring), to relative accuracy ``tol``: of the eigenvalue
    (``bound="eigenvalue"``, the quadratic bound ``r²/γ``) or of the residual (``"residual"``).

    ``which="LA"``: largest algebraic (the sharpest directions); ``"LM"``: largest magnitude (the
    most negative too). ``max_iter``: Lanczos steps (products) at most (default
    ``min(n, max(64, 10k))``); ``max_vectors``: Krylov vectors kept on the device (None: all), older
    ones move to host memory with ``offload`` (default: on a GPU) or the run restarts (package
    docstring). ``params`` chooses the subspace (``"lora"``: the LoRA factors), ``blocks``
    gives per-block results instead (``"layer"``: every module with parameters of its own; or a dict
    name → parameter choice; each block cut down to ``params``) as a dict name → result.
    ``distributed``: reduce every product over the ranks' data (None: when a process group is
    initialized; :mod:`..objective`).
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
                lambda op: lanczos_top(op, k, which, tol, max_iter, max_vectors, bool(eigenvectors), bound,
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


def batch_top_eigenvalues(model: nn.Module, loss_fn: Optional[LossFn], data: Any, *, which: str = "LA",
                          tol: float = 1e-3, max_iter: Optional[int] = None, max_vectors: Optional[int] = None,
                          params: ParamSpec = None, mode: str = "eval", seed: int = 0, curvature: str = "hessian",
                          method: str = "auto", outputs_fn: Optional[OutputsFn] = None,
                          criterion: Optional[Criterion] = None,
                          distributed: Optional[bool] = None) -> BatchEigenvalues:
    """The dominant eigenvalue of the curvature on each batch of ``data`` separately, as a
    distribution (histogram, median, min, max), by Lanczos (as
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
                result = lanczos_top(op, 1, which, tol, max_iter, max_vectors, False)
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
