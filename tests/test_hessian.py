"""Curvature diagnostics against dense matrices: a quadratic with a known spectrum, least squares,
and small float64 networks (BatchNorm, two batches of different sizes) whose Hessian, GGN and
empirical Fisher are built explicitly; plus the guarantees every diagnostic gives (model untouched,
bad arguments refused)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_untouched, check_untouched, snapshot
from torch import nn

from flatminima.diagnostics import Objective, batch_size
from flatminima.diagnostics.hessian import (CurvatureOperator, batch_top_eigenvalues, hessian_trace, hvp,
                                            power_iteration, spectral_density, top_eigenvalues)
from flatminima.models import SmallCNN

D = torch.float64
METHODS = ["forward_over_reverse", "double_backward", "finite_difference"]


# -- problems --------------------------------------------------------------------------------

EIGS = torch.tensor([9.0, 6.5, 5.0, 4.1, 3.0, 2.2, 1.7, 1.0, 0.5, -1.0, -2.5, -4.0], dtype=D)


class Quadratic(nn.Module):
    """``½xᵀAx`` with ``x = concat(W.flatten(), b)`` (two parameter tensors)."""

    def __init__(self, A: torch.Tensor, seed: int = 1):
        super().__init__()
        x = torch.randn(A.shape[0], generator=torch.Generator().manual_seed(seed), dtype=D)
        self.register_buffer("A", A)
        self.W = nn.Parameter(x[:6].view(2, 3).clone())
        self.b = nn.Parameter(x[6:].clone())

    def forward(self, batch=None) -> torch.Tensor:
        x = torch.cat([self.W.flatten(), self.b])
        return 0.5 * x @ self.A @ x


def symmetric(eigs: torch.Tensor = EIGS, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=torch.Generator().manual_seed(seed), dtype=D))
    return q @ torch.diag(eigs) @ q.T


def quad_loss(model, batch):
    return model(batch)


ONE = torch.zeros(1, dtype=D)  # a batch the quadratic ignores


def ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def batches(sizes=(5, 3), shape=(4,), classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g, dtype=D), torch.randint(0, classes, (n,), generator=g)) for n in sizes]


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallCNN(1, 3, width=2, side=8).double()
    with torch.no_grad():  # non-trivial running statistics, so eval and train mode differ
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def flat_fn(objective: Objective, fn=None):
    """``x ↦ Σ_B |B|·fn(w(x), B) / N`` over the objective's batches, ``w(x)`` the flat parameters
    reshaped (``fn`` defaults to the loss), and the flat point."""
    params = objective.params
    sizes = [p.numel() for p in params]
    data = list(objective.batches())
    count = sum(batch_size(b) for b in data)

    def split(x):
        return [c.view(p.shape) for c, p in zip(x.split(sizes), params)]

    def f(x):
        return sum(objective.loss(split(x), b) * batch_size(b) for b in data) / count

    return f, split, torch.cat([p.detach().reshape(-1) for p in params])


def dense_hessian(objective: Objective) -> torch.Tensor:
    # torch.autograd.functional.hessian, not torch.func.hessian: the latter vmaps over tangents and
    # is silently wrong for a train-mode BatchNorm.
    # SDPA on its math backend: the fused CPU kernel has no double backward.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    f, _, x0 = flat_fn(objective)
    with objective.session(), sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(f, x0)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def top(matrix: torch.Tensor, k: int, which: str = "LA") -> np.ndarray:
    ev = torch.linalg.eigvalsh(matrix).numpy()
    return ev[np.argsort(-ev if which == "LA" else -np.abs(ev))[:k]]




# -- the quadratic: closed-form spectrum -----------------------------------------------------


@pytest.mark.parametrize("which", ["LA", "LM"])
def test_lanczos_top_k_on_a_quadratic_matches_eigh(which):
    model = Quadratic(symmetric())
    r = top_eigenvalues(model, quad_loss, ONE, k=4, which=which, tol=1e-10, eigenvectors=True)
    expected = top(model.A, 4, which)
    np.testing.assert_allclose(r.values, expected, rtol=1e-6)
    assert r.converged.all() and r.algorithm == "lanczos" and r.numel == 12
    assert r.method == "double_backward" and r.hvps == r.iterations <= 12
    for lam, vec in zip(r.values, r.eigenvectors):  # Ritz vectors are eigenvectors
        y = flat(vec)
        torch.testing.assert_close(model.A @ y, lam * y, atol=1e-6, rtol=0)


def test_lanczos_finds_the_negative_end_by_magnitude():
    eigs = torch.tensor([3.0, 2.0, 1.0, 0.5, -0.3, -7.0], dtype=D)
    model = Quadratic(symmetric(torch.cat([eigs, torch.linspace(-0.2, 0.2, 6, dtype=D)])))
    r = top_eigenvalues(model, quad_loss, ONE, k=2, which="LM", tol=1e-10)
    np.testing.assert_allclose(r.values, [-7.0, 3.0], rtol=1e-6)


def test_power_iteration_matches_eigh_with_deflation():
    model = Quadratic(symmetric())
    r = power_iteration(model, quad_loss, ONE, k=1, tol=1e-8, max_iter=500)
    np.testing.assert_allclose(r.values, [9.0], rtol=1e-6)
    assert r.converged.all() and r.algorithm == "power" and r.hvps == r.iterations
    r2 = power_iteration(model, quad_loss, ONE, k=3, tol=1e-8, max_iter=500)
    np.testing.assert_allclose(r2.values, [9.0, 6.5, 5.0], rtol=1e-6)
    assert r2.converged.all()
    lanczos = top_eigenvalues(model, quad_loss, ONE, k=1, tol=1e-8)
    assert lanczos.hvps < r.hvps  # far fewer products to the same tolerance


def test_hutchinson_contains_the_trace_within_its_standard_errors():
    model = Quadratic(symmetric())
    true = float(EIGS.sum())
    for seed in range(4):
        t = hessian_trace(model, quad_loss, ONE, probes=60, rtol=0.0, seed=seed)
        assert t.probes == 60 and len(t.samples) == 60 and not t.converged
        assert abs(t.trace - true) <= 3.5 * t.stderr, (seed, t.trace, t.stderr)
        assert t.stderr == pytest.approx(np.std(t.samples, ddof=1) / np.sqrt(60))
    # A diagonal A: every Rademacher sample is exactly tr(A), so it stops at min_probes.
    diag = Quadratic(torch.diag(EIGS))
    t = hessian_trace(diag, quad_loss, ONE, probes=100, rtol=1e-3, min_probes=5)
    assert t.probes == 5 and t.converged and t.stderr == pytest.approx(0.0, abs=1e-12)
    assert t.trace == pytest.approx(true, rel=1e-12)


def test_slq_density_integrates_to_one_and_sits_on_the_spectrum():
    model = Quadratic(symmetric())
    d = spectral_density(model, quad_loss, ONE, probes=6, steps=12, points=2000, sigma=0.05)
    assert d.nodes.shape == d.weights.shape == (6, 12) and d.hvps == 6 * 12
    np.testing.assert_allclose(d.weights.sum(axis=1), 1.0, atol=1e-12)
    assert np.trapezoid(d.density, d.grid) == pytest.approx(1.0, abs=1e-6)
    # 12 steps on a 12-dimensional space: the nodes are the eigenvalues.
    np.testing.assert_allclose(np.sort(d.nodes, axis=1), np.tile(np.sort(EIGS.numpy()), (6, 1)), atol=1e-8)
    near = np.min(np.abs(d.grid[:, None] - EIGS.numpy()[None, :]), axis=1) <= 3 * d.sigma
    assert np.trapezoid(np.where(near, d.density, 0.0), d.grid) >= 0.99

    # Fewer steps than the dimension: still a density on the spectrum's span, and Σ τθ = vᵀAv per probe,
    # so the SLQ trace is Hutchinson's with the same probes (same generator, same seed).
    d = spectral_density(model, quad_loss, ONE, probes=20, steps=5)
    assert np.trapezoid(d.density, d.grid) == pytest.approx(1.0, abs=1e-6)
    inside = (d.grid >= -4.0 - 3 * d.sigma) & (d.grid <= 9.0 + 3 * d.sigma)
    assert np.trapezoid(np.where(inside, d.density, 0.0), d.grid) >= 0.9
    t = hessian_trace(model, quad_loss, ONE, probes=20, rtol=0.0)
    assert d.trace == pytest.approx(t.trace, rel=1e-9)
    assert abs(d.trace - float(EIGS.sum())) <= 4 * t.stderr


def test_max_vectors_offloads_the_basis_and_gives_the_same_eigenvalues():
    model = Quadratic(symmetric())
    full = top_eigenvalues(model, quad_loss, ONE, k=3, tol=1e-10)
    small = top_eigenvalues(model, quad_loss, ONE, k=3, tol=1e-10, max_vectors=2, offload=True)
    assert full.iterations > 2 and full.device_vectors == full.iterations
    assert small.device_vectors == 2 and small.iterations == full.iterations
    np.testing.assert_allclose(small.values, full.values, rtol=1e-12)
    # without offload (the CPU default) thick restarts: never more than max(max_vectors, k + 2) vectors
    restarted = top_eigenvalues(model, quad_loss, ONE, k=3, tol=1e-8, max_vectors=5, bound="residual")
    assert restarted.device_vectors == 5 and restarted.iterations > 5 and restarted.converged.all()
    np.testing.assert_allclose(restarted.values, full.values, rtol=1e-6)
    one = top_eigenvalues(model, quad_loss, ONE, k=1, tol=1e-9, max_vectors=3, bound="residual")
    assert one.device_vectors == 3 and one.values[0] == pytest.approx(full.values[0], rel=1e-7)
    d1 = spectral_density(model, quad_loss, ONE, probes=2, steps=8)
    d2 = spectral_density(model, quad_loss, ONE, probes=2, steps=8, max_vectors=1)
    np.testing.assert_allclose(d2.nodes, d1.nodes, atol=1e-10)


# -- least squares ---------------------------------------------------------------------------


def test_linear_least_squares_hessian_is_2_xtx_over_n():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(20, 5, generator=g, dtype=D), torch.randn(20, 1, generator=g, dtype=D)
    torch.manual_seed(0)
    model = nn.Linear(5, 1).double()

    def mse(m, batch):
        return nn.functional.mse_loss(m(batch[0]), batch[1])

    Xt = torch.cat([X, torch.ones(20, 1, dtype=D)], dim=1)  # weight then bias
    H = 2 * Xt.T @ Xt / 20
    for curvature in ("hessian", "ggn"):
        r = top_eigenvalues(model, mse, (X, y), k=6, tol=1e-10, curvature=curvature,
                            outputs_fn=lambda m, b: m(b[0]), criterion=lambda out, b: nn.functional.mse_loss(out, b[1]))
        np.testing.assert_allclose(r.values, top(H, 6), rtol=1e-8)
    # Empirical Fisher: per-sample gradients g_i = 2 r_i x̃_i, F = Σ g_i g_iᵀ / n.
    residual = (model(X) - y).detach()
    G = 2 * residual * Xt
    F = G.T @ G / 20
    r = top_eigenvalues(model, mse, (X, y), k=3, tol=1e-10, curvature="fisher")
    np.testing.assert_allclose(r.values, top(F, 3), rtol=1e-8)


# -- small networks against dense matrices ---------------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_network_eigenvalues_match_the_dense_hessian(arch, mode):
    model = mlp() if arch == "mlp" else cnn()
    data = batches() if arch == "mlp" else batches(shape=(1, 8, 8))
    H = dense_hessian(Objective(model, ce, data, mode=mode))
    for which in ("LA", "LM"):
        r = top_eigenvalues(model, ce, data, k=3, which=which, tol=1e-9, mode=mode)
        np.testing.assert_allclose(r.values, top(H, 3, which), rtol=1e-4)
        assert r.converged.all()
    p = power_iteration(model, ce, data, k=1, tol=1e-7, max_iter=1000, mode=mode)
    np.testing.assert_allclose(p.values, top(H, 1, "LM"), rtol=1e-4)
    # Hutchinson samples are zᵀHz exactly: check them against the dense matrix.
    t = hessian_trace(model, ce, data, probes=3, rtol=0.0, mode=mode)
    gen = torch.Generator().manual_seed(0)
    zs = [torch.randint(0, 2, (H.shape[0],), generator=gen).to(D).mul_(2).sub_(1) for _ in range(3)]
    np.testing.assert_allclose(t.samples, [float(z @ H @ z) for z in zs], rtol=1e-8)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_every_hvp_method_gives_the_same_product(mode):
    model, data = cnn(), batches(shape=(1, 8, 8))
    objective = Objective(model, ce, data, mode=mode)
    H = dense_hessian(objective)
    _, split, x0 = flat_fn(objective)
    v = torch.randn(x0.numel(), generator=torch.Generator().manual_seed(3), dtype=D)
    expected = H @ v
    for method in METHODS:
        got = flat(hvp(objective, split(v), method=method))
        tol = 1e-5 if method == "finite_difference" else 1e-10
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol * expected.abs().max().item(), msg=method)
    # One batch on its own: hvp(objective, v, batch) is that batch's Hessian.
    Hb = dense_hessian(Objective(model, ce, data[1], mode=mode))
    for method in METHODS:
        got = flat(hvp(objective, split(v), data[1], method=method))
        tol = 1e-5 if method == "finite_difference" else 1e-10
        torch.testing.assert_close(got, Hb @ v, rtol=tol, atol=tol * expected.abs().max().item(), msg=method)


def test_cached_double_backward_graph_gives_the_same_products():
    """On one batch double backward keeps its first-order graph: repeated products stay exact."""
    model, data = mlp(), batches()[0]
    objective = Objective(model, ce, data)
    H = dense_hessian(objective)
    _, split, x0 = flat_fn(objective)
    op = CurvatureOperator(objective, method="double_backward")
    gen = torch.Generator().manual_seed(0)
    with objective.session():
        for _ in range(3):
            v = torch.randn(x0.numel(), generator=gen, dtype=D)
            torch.testing.assert_close(flat(op(split(v))), H @ v, rtol=1e-10, atol=1e-12)
        assert op._graph is not None and op.products == 3
        op.release()
    assert op._graph is None


def _dense_ggn_and_fisher(model, data):
    objective = Objective(model, ce, data)
    outputs = Objective(model, lambda m, b: m(b[0]), data)
    _, split, x0 = flat_fn(objective)
    count = sum(batch_size(b) for b in data)
    G = torch.zeros(x0.numel(), x0.numel(), dtype=D)
    grads = []
    with objective.session():
        for b in data:
            logits = outputs.loss(split(x0), b)
            J = torch.autograd.functional.jacobian(lambda x: outputs.loss(split(x), b).reshape(-1), x0)
            Q = torch.autograd.functional.hessian(lambda o: nn.functional.cross_entropy(o.view(logits.shape), b[1]),
                                                  logits.detach().reshape(-1))
            G += batch_size(b) / count * J.T @ Q @ J
            for i in range(batch_size(b)):
                one = (b[0][i:i + 1], b[1][i:i + 1])
                grads.append(torch.autograd.functional.jacobian(lambda x: objective.loss(split(x), one), x0))
    S = torch.stack(grads)
    return G, S.T @ S / count, split, x0


def test_ggn_and_empirical_fisher_match_dense_matrices():
    model, data = mlp(), batches()
    G, F, split, x0 = _dense_ggn_and_fisher(model, data)
    kw = dict(outputs_fn=lambda m, b: m(b[0]), criterion=lambda out, b: nn.functional.cross_entropy(out, b[1]))
    objective = Objective(model, ce, data)
    v = torch.randn(x0.numel(), generator=torch.Generator().manual_seed(5), dtype=D)
    for curvature, C, extra in (("ggn", G, kw), ("fisher", F, {})):
        for method in METHODS:
            got = flat(hvp(objective, split(v), curvature=curvature, method=method, **extra))
            tol = 1e-5 if method == "finite_difference" else 1e-10
            torch.testing.assert_close(got, C @ v, rtol=tol, atol=tol * (C @ v).abs().max().item(),
                                       msg=f"{curvature} {method}")
        r = top_eigenvalues(model, ce, data, k=2, tol=1e-9, curvature=curvature, **extra)
        np.testing.assert_allclose(r.values, top(C, 2), rtol=1e-6)
    assert torch.linalg.eigvalsh(G).min() > -1e-10  # the GGN of cross-entropy is PSD
    # GGN from the split alone (loss_fn=None): the loss is criterion(outputs_fn(model, B), B).
    r = top_eigenvalues(model, None, data, k=1, tol=1e-9, curvature="ggn", **kw)
    np.testing.assert_allclose(r.values, top(G, 1), rtol=1e-6)


def test_blocks_give_the_diagonal_blocks_of_the_hessian():
    model, data = mlp(), batches()
    H = dense_hessian(Objective(model, ce, data))
    first = slice(0, 30)  # 0.weight (6×4) and 0.bias
    last = slice(30, 51)  # 2.weight (3×6) and 2.bias
    per_layer = top_eigenvalues(model, ce, data, k=2, tol=1e-9, blocks="layer")
    assert list(per_layer) == ["0", "2"]
    np.testing.assert_allclose(per_layer["0"].values, top(H[first, first], 2), rtol=1e-6)
    np.testing.assert_allclose(per_layer["2"].values, top(H[last, last], 2), rtol=1e-6)
    named = hessian_trace(model, ce, data, probes=200, rtol=0.0, blocks={"head": model[2], "weights": r"weight$"})
    assert set(named) == {"head", "weights"}
    for name, t in named.items():
        idx = [*range(30, 51)] if name == "head" else [*range(0, 24), *range(30, 48)]
        true = float(H[idx][:, idx].trace())
        assert abs(t.trace - true) <= 4 * t.stderr, name
    # A regex over the parameters: the same sub-block.
    sub = top_eigenvalues(model, ce, data, k=1, tol=1e-9, params=r"^2\.")
    np.testing.assert_allclose(sub.values, top(H[last, last], 1), rtol=1e-6)


def test_per_batch_dominant_eigenvalue_distribution():
    model, data = mlp(), batches(sizes=(6, 4, 5))
    result = batch_top_eigenvalues(model, ce, data, tol=1e-9)
    expected = [top(dense_hessian(Objective(model, ce, b)), 1)[0] for b in data]
    np.testing.assert_allclose(result.values, expected, rtol=1e-6)
    assert list(result.batch_sizes) == [6, 4, 5] and result.converged.all()
    assert result.min == pytest.approx(min(expected)) and result.max == pytest.approx(max(expected))
    assert result.median == pytest.approx(np.median(expected))
    assert result.hvps == sum(top_eigenvalues(model, ce, b, tol=1e-9).hvps for b in data)
    assert result.method == "double_backward"  # one batch each: the cached-graph product


# -- fallbacks -------------------------------------------------------------------------------


class TanhFirstOrder(torch.autograd.Function):
    """tanh with a first derivative only, like a fused kernel: no forward-mode rule (old-style, no
    ``setup_context``: torch.func refuses it) and a backward that refuses to be differentiated."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():
            raise RuntimeError("derivative for fused_tanh_backward is not implemented")
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class CustomMLP(nn.Module):
    def __init__(self, act=torch.tanh):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.act = nn.Linear(4, 6).double(), nn.Linear(6, 3).double(), act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("data", [batches(), batches()[0]], ids=["two-batches", "one-batch"])
def test_auto_falls_back_to_forward_over_reverse_then_finite_differences(data, monkeypatch):
    reference = top_eigenvalues(CustomMLP(), ce, data, k=2, tol=1e-9)
    assert reference.method == "double_backward"
    r = top_eigenvalues(CustomMLP(TanhFirstOrder.apply), ce, data, k=2, tol=1e-9)
    assert r.method == "finite_difference"
    np.testing.assert_allclose(r.values, reference.values, rtol=1e-5)
    with pytest.raises(RuntimeError, match="fused_tanh_backward"):
        top_eigenvalues(CustomMLP(TanhFirstOrder.apply), ce, data, method="double_backward")

    product = CurvatureOperator._product

    def no_double_backward(self, method, v, batch):  # an op with a forward-mode rule only
        if method == "double_backward":
            raise NotImplementedError("derivative for op_backward is not implemented")
        return product(self, method, v, batch)

    monkeypatch.setattr(CurvatureOperator, "_product", no_double_backward)
    r = top_eigenvalues(CustomMLP(), ce, data, k=2, tol=1e-9)
    assert r.method == "forward_over_reverse"
    np.testing.assert_allclose(r.values, reference.values, rtol=1e-8)


# -- guarantees ------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(2 * 16, 3)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


DIAGNOSTICS = {
    "lanczos": lambda m, d, **kw: top_eigenvalues(m, ce, d, k=2, max_iter=8, **kw),
    "power": lambda m, d, **kw: power_iteration(m, ce, d, max_iter=5, **kw),
    "trace": lambda m, d, **kw: hessian_trace(m, ce, d, probes=3, **kw),
    "density": lambda m, d, **kw: spectral_density(m, ce, d, probes=2, steps=4, points=50, **kw),
    "per_batch": lambda m, d, **kw: batch_top_eigenvalues(m, ce, d, max_iter=4, **kw),
    "fisher": lambda m, d, **kw: top_eigenvalues(m, ce, d, max_iter=4, curvature="fisher", **kw),
}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", sorted(DIAGNOSTICS))
def test_model_untouched(name, mode):
    model, data = Net().double(), batches(sizes=(4, 3), shape=(1, 4, 4))
    model.train()
    model.fc.eval()  # mixed flags must come back as they were
    model.conv.bias.requires_grad_(False)
    check_untouched(DIAGNOSTICS[name], model, data, mode)


BAD = [
    (top_eigenvalues, dict(k=0), "k"),
    (top_eigenvalues, dict(k=1000), "k"),
    (top_eigenvalues, dict(which="SA"), "which"),
    (top_eigenvalues, dict(tol=0.0), "tol"),
    (top_eigenvalues, dict(max_vectors=0), "max_vectors"),
    (top_eigenvalues, dict(k=3, max_iter=2), "max_iter"),
    (top_eigenvalues, dict(method="newton"), "method"),
    (top_eigenvalues, dict(curvature="exact"), "curvature"),
    (top_eigenvalues, dict(curvature="ggn"), "outputs_fn"),
    (top_eigenvalues, dict(params="nothing-matches"), "params"),
    (top_eigenvalues, dict(blocks="module"), "blocks"),
    (top_eigenvalues, dict(blocks={"x": "nothing-matches"}), "blocks"),
    (top_eigenvalues, dict(mode="inference"), "mode"),
    (power_iteration, dict(k=0), "k"),
    (power_iteration, dict(max_iter=0), "max_iter"),
    (hessian_trace, dict(probes=0), "probes"),
    (hessian_trace, dict(rtol=-1.0), "rtol"),
    (spectral_density, dict(probes=0), "probes"),
    (spectral_density, dict(steps=0), "steps"),
    (spectral_density, dict(sigma=-1.0), "sigma"),
    (batch_top_eigenvalues, dict(method="exact"), "method"),
]


@pytest.mark.parametrize("fn,kwargs,name", BAD, ids=[f"{f.__name__}-{n}-{i}" for i, (f, _, n) in enumerate(BAD)])
def test_bad_arguments_are_refused_and_leave_the_model_alone(fn, kwargs, name):
    model, data = mlp(), batches()
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        fn(model, ce, data, **kwargs)
    assert_untouched(model, before)


def test_hvp_refuses_a_misshapen_vector():
    model, data = mlp(), batches()
    objective = Objective(model, ce, data)
    with pytest.raises(ValueError, match="Invalid v"):
        hvp(objective, [torch.zeros(3, dtype=D)])
    with pytest.raises(ValueError, match="Invalid method"):
        hvp(objective, objective.point(), method="exact")


# -- a transformer with LoRA -----------------------------------------------------------------


def test_tiny_bert_with_lora():
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import LoraConfig, get_peft_model

    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(config).double()
    model = get_peft_model(base, LoraConfig(r=1, lora_alpha=2, target_modules=["query", "value"],
                                            init_lora_weights=False))
    g = torch.Generator().manual_seed(0)
    # Token 0 is the padding index, whose embedding row autograd leaves out of the gradient (that
    # gradient map has a non-symmetric Jacobian): keep it out of the data.
    batch = dict(input_ids=torch.randint(1, 40, (4, 6), generator=g), attention_mask=torch.ones(4, 6, dtype=torch.long),
                 labels=torch.randint(0, 2, (4,), generator=g))
    batch["attention_mask"][0, 4:] = 0

    def loss(m, b):
        return m(**b).loss

    before = snapshot(model)
    lora = Objective(model, loss, batch, params="lora")
    assert lora.numel == 2 * 2 * (16 + 16)
    H = dense_hessian(lora)
    r = top_eigenvalues(model, loss, batch, k=2, tol=1e-9, params="lora")
    np.testing.assert_allclose(r.values, top(H, 2), rtol=1e-6)
    everything = Objective(model, loss, batch, params="all")
    _, split, x0 = flat_fn(everything)
    v = torch.randn(x0.numel(), generator=g, dtype=D)
    products = {m: flat(hvp(everything, split(v), method=m)) for m in METHODS}
    for method in METHODS[1:]:
        torch.testing.assert_close(products[method], products[METHODS[0]], rtol=1e-5,
                                   atol=1e-5 * products[METHODS[0]].abs().max().item(), msg=method)
    full = top_eigenvalues(model, loss, batch, k=1, tol=1e-6, params="all")
    assert full.converged.all() and full.values[0] >= r.values[0] - 1e-8  # a superset of directions
    assert_untouched(model, before)
