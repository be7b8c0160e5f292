"""Curvature of the objective: Hessian-vector products, top eigenvalues (Lanczos, power iteration),
trace (Hutchinson) and spectral density (stochastic Lanczos quadrature), for the chosen parameters,
per block, for the LoRA factors, and per evaluation batch.

``L(w) = Σ_B |B|·L_B(w) / Σ_B |B|`` is the objective of :mod:`..objective`, ``w`` the ``n`` chosen
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
batches of every rank under ``torch.distributed`` (``distributed``, :mod:`..objective`: each product
is all-reduced, so every rank runs the algorithm on the whole data's operator). Nothing is
written to the model: parameters are substituted (:class:`~..objective.Objective`), random vectors come
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

Modules: :mod:`.operator` (``Cv`` and :func:`hvp`), :mod:`.krylov` (the basis, Lanczos and its bounds),
:mod:`.eigenvalues` (Lanczos, power iteration, per batch), :mod:`.spectrum` (Hutchinson, SLQ),
:mod:`.results` and :mod:`.blocks` (the shared checks and the per-block runs).
"""

from .blocks import BlockSpec
from .eigenvalues import WHICH, batch_top_eigenvalues, power_iteration, top_eigenvalues
from .krylov import BOUNDS
from .operator import CURVATURES, METHODS, Criterion, CurvatureOperator, OutputsFn, hvp
from .results import BatchEigenvalues, Eigenvalues, SpectralDensity, Trace
from .spectrum import hessian_trace, spectral_density

# The private helpers stay importable from here, as before the split.
from .blocks import _blocks, _check_setup, _run  # noqa: F401
from .eigenvalues import lanczos_top, _power  # noqa: F401
from .krylov import (_Basis, _bounds, _Flat, _generator, _lanczos, _thick_restart_lanczos, _tridiagonal,  # noqa: F401
                     _unit, _wanted)
from .operator import (_DB, _DETECTED, _FD, _FOR, _fd_step, _grad, _gradient, _leaves,  # noqa: F401
                       _math_attention, _norm, _per_sample, _shift)
from .spectrum import _hutchinson, _slq  # noqa: F401

__all__ = [
    "BOUNDS", "CURVATURES", "METHODS", "WHICH", "BatchEigenvalues", "BlockSpec", "Criterion", "CurvatureOperator",
    "Eigenvalues", "OutputsFn", "SpectralDensity", "Trace", "batch_top_eigenvalues", "hessian_trace", "hvp",
    "power_iteration", "spectral_density", "top_eigenvalues",
]
