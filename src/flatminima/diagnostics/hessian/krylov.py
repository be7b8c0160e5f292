"""Krylov machinery on flat vectors: the basis, Lanczos (plain and thick-restart) and its convergence bounds."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ...core.kernels import TINY
from .operator import CurvatureOperator


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
    ``tol·|θ_i|`` (package docstring: ``r_i``, or ``min(r_i, r_i²/γ̂_i)`` for ``bound="eigenvalue"``;
    near-zero ``θ_i`` are measured against ``√ε·max|θ|`` instead, so that they can converge)."""
    residuals = np.abs(beta * S[-1, idx])
    errors = residuals
    if bound == "eigenvalue" and len(theta) > 1:
        gaps = np.array([np.min(np.abs(np.delete(theta, i) - theta[i])) for i in idx])
        errors = np.minimum(residuals, residuals**2 / np.maximum(gaps, TINY))
    floor = math.sqrt(np.finfo(np.float64).eps) * float(np.max(np.abs(theta)))
    return residuals, errors <= tol * np.maximum(np.abs(theta[idx]), floor)


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
