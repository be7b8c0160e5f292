"""The results of the curvature diagnostics: eigenvalues, trace, spectral density, per-batch eigenvalues."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from torch import Tensor

from ..sharpness import Result


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
    """The dominant eigenvalue on each batch on its own: ``values[b]`` for batch ``b``
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
