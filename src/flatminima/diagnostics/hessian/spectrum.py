"""The trace (Hutchinson) and the spectral density (stochastic Lanczos quadrature) of the curvature."""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from ...core.kernels import TINY
from ...core.validation import check_int, check_nonnegative, check_positive
from ..objective import LossFn, ParamSpec
from .blocks import BlockSpec, _run
from .krylov import _Basis, _Flat, _generator, _lanczos, _tridiagonal
from .operator import Criterion, CurvatureOperator, OutputsFn
from .results import SpectralDensity, Trace


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


def hessian_trace(model: nn.Module, loss_fn: Optional[LossFn], data: Any, *, probes: int = 100,
                  rtol: float = 1e-2, min_probes: int = 10, params: ParamSpec = None, blocks: BlockSpec = None,
                  mode: str = "eval", seed: int = 0, curvature: str = "hessian", method: str = "auto",
                  outputs_fn: Optional[OutputsFn] = None,
                  criterion: Optional[Criterion] = None,
                  distributed: Optional[bool] = None) -> Union[Trace, dict[str, Trace]]:
    """``tr(C)`` by Hutchinson's estimator with Rademacher probes: at most ``probes`` of them,
    stopping once ``stderr ≤ rtol·|estimate|`` after at least ``min_probes``. Arguments as in
    :func:`~.eigenvalues.top_eigenvalues`."""
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
    as in :func:`~.eigenvalues.top_eigenvalues`."""
    check_int("probes", probes, 1)
    check_int("steps", steps, 1)
    check_int("points", points, 2)
    if sigma is not None:
        sigma = check_positive("sigma", sigma)
    if max_vectors is not None:
        check_int("max_vectors", max_vectors, 1)
    return _run(model, loss_fn, data, params, blocks, mode, seed, curvature, method, outputs_fn, criterion,
                lambda op: _slq(op, probes, steps, points, sigma, max_vectors), distributed)
