"""Sharpness and robustness diagnostics against closed forms on ``½(x − c)ᵀA(x − c)`` (float64),
and the guarantees every diagnostic gives: the model is left exactly as it was."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from helpers import assert_untouched, check_untouched, snapshot
from torch import nn

from flatminima.diagnostics.robustness import accuracy, corruption_robustness, perturbation_curve
from flatminima.diagnostics.sharpness import (average_sharpness, generator, m_sharpness, random_in_ball,
                                              split_batch, worst_case_sharpness)

D = torch.float64


class Quadratic(nn.Module):
    """``L(x; C) = mean_i ½(x − c_i)ᵀA(x − c_i)`` with ``x = concat(W.flatten(), b)``: a 2×3 matrix
    (two filters) and a 2-vector, so element-, filter- and layer-wise scales all differ."""

    def __init__(self, A: torch.Tensor, x: torch.Tensor):
        super().__init__()
        self.register_buffer("A", A)
        self.W = nn.Parameter(x[:6].view(2, 3).clone())
        self.b = nn.Parameter(x[6:].clone())

    def flat(self) -> torch.Tensor:
        return torch.cat([self.W.flatten(), self.b])

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        r = self.flat() - c
        return 0.5 * ((r @ self.A) * r).sum(-1).mean()


def quad_loss(model, batch):
    return model(batch[0] if isinstance(batch, tuple) else batch)


EIGS = torch.tensor([3.0, 1.5, 1.0, 0.8, 0.5, 0.3, 0.2, 0.1], dtype=D)


def spd(seed: int = 0, eigs: torch.Tensor = EIGS) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(seed), dtype=D))
    return q @ torch.diag(eigs) @ q.T


def point(seed: int = 1) -> torch.Tensor:
    return torch.randn(8, generator=torch.Generator().manual_seed(seed), dtype=D)


ORIGIN = torch.zeros(1, 8, dtype=D)  # one batch, one "example" c = 0: L(x) = ½xᵀAx


def trust_region_max(g: np.ndarray, H: np.ndarray, rho: float) -> float:
    """``max_{‖v‖₂ ≤ ρ} gᵀv + ½vᵀHv`` for PSD ``H``: ``v = (μI − H)⁻¹g`` with ``μ > λ_max`` and
    ``‖v‖ = ρ`` (the secular equation, solved by bisection in H's eigenbasis)."""
    lam, Q = np.linalg.eigh(H)
    gt = Q.T @ g
    lo, hi = lam[-1] + 1e-15, lam[-1] + np.linalg.norm(g) / rho + 1.0
    for _ in range(200):
        mu = 0.5 * (lo + hi)
        if np.linalg.norm(gt / (mu - lam)) > rho:
            lo = mu
        else:
            hi = mu
    v = gt / (mu - lam)
    return float(gt @ v + 0.5 * (v * lam) @ v)




# -- worst case ------------------------------------------------------------------------------


def test_worst_case_l2_at_the_minimum_is_half_rho2_lambda_max():
    model, rho = Quadratic(spd(), torch.zeros(8, dtype=D)), 0.1
    # The gradient vanishes at the minimum: start at random; steps of size ρ are a power iteration.
    r = worst_case_sharpness(model, quad_loss, ORIGIN, rho=rho, steps=40, step_size=rho, init="random")
    assert r.sharpness == pytest.approx(0.5 * rho ** 2 * 3.0, abs=1e-6)
    assert r.loss == 0.0 and r.perturbation_norm == pytest.approx(rho, rel=1e-12)
    assert r.perturbed_loss == max(r.path) and len(r.path) == 41
    # From zero at a zero gradient nothing moves: the estimate is the clean loss, and says so.
    assert worst_case_sharpness(model, quad_loss, ORIGIN, rho=rho, steps=3).sharpness == 0.0


@pytest.mark.parametrize("scale", [None, "element"])
def test_worst_case_l2_off_the_minimum_is_the_trust_region_maximum(scale):
    A, x, rho = spd(), point(), 0.3
    model = Quadratic(A, x)
    r = worst_case_sharpness(model, quad_loss, ORIGIN, rho=rho, steps=60, step_size=rho, scale=scale, eta=0.01)
    # ε = T·v with ‖v‖ ≤ ρ: maximise (T A x)ᵀv + ½vᵀ(T A T)v.
    t = np.ones(8) if scale is None else np.abs(x.numpy()) + 0.01
    a, xn = A.numpy(), x.numpy()
    expected = trust_region_max(t * (a @ xn), t[:, None] * a * t[None, :], rho)
    assert r.sharpness == pytest.approx(expected, rel=1e-9)
    assert r.perturbation_norm == pytest.approx(rho, rel=1e-9)


def test_one_step_from_zero_is_sams_perturbation():
    A, x, rho = spd(), point(), 0.2
    r = worst_case_sharpness(Quadratic(A, x), quad_loss, ORIGIN, rho=rho, steps=1, step_size=rho)
    g = A @ x
    y = x + rho * g / g.norm()
    assert r.path[0] == pytest.approx(float(0.5 * x @ A @ x), rel=1e-14)
    assert r.path[1] == pytest.approx(float(0.5 * y @ A @ y), rel=1e-14)


def test_worst_case_linf_against_closed_form_and_brute_force():
    rho = 0.1
    # Diagonal PSD A: separable, each coordinate goes to sign(x_i)·ρ, so
    # S = Σ_i ½A_ii((|x_i| + ρ)² − x_i²); at x = 0 that is ½ρ²·tr(A).
    A, x = torch.diag(EIGS), point()
    r = worst_case_sharpness(Quadratic(A, x), quad_loss, ORIGIN, rho=rho, norm="inf", steps=5)
    expected = float((0.5 * EIGS * ((x.abs() + rho) ** 2 - x ** 2)).sum())
    assert r.sharpness == pytest.approx(expected, rel=1e-12)
    assert r.perturbation_norm == pytest.approx(rho, rel=1e-12)
    r = worst_case_sharpness(Quadratic(A, torch.zeros(8, dtype=D)), quad_loss, ORIGIN, rho=rho, norm="inf", steps=5,
                             init="random")
    assert r.sharpness == pytest.approx(0.5 * rho ** 2 * float(EIGS.sum()), rel=1e-12)
    # A general PSD A: a convex function peaks at a vertex of the cube; the ascent ends on one
    # (a local maximum, sign(Aε) = sign(ε)), never above the brute-force maximum over all 256.
    A = spd()
    best = max(0.5 * rho ** 2 * float(torch.tensor(s, dtype=D) @ A @ torch.tensor(s, dtype=D))
               for s in itertools.product((-1.0, 1.0), repeat=8))
    r = worst_case_sharpness(Quadratic(A, torch.zeros(8, dtype=D)), quad_loss, ORIGIN, rho=rho, norm="inf",
                             steps=20, init="random")
    assert 0.5 * rho ** 2 * float(EIGS[0]) < r.sharpness <= best + 1e-15
    assert best < 0.5 * rho ** 2 * float(A.abs().sum())  # the Σ|A_ij| bound is not attained here


# -- average case ----------------------------------------------------------------------------


def test_average_sharpness_uniform_is_half_sigma2_trace_within_its_stderr():
    A, sigma, n = spd(), 0.1, 400
    r = average_sharpness(Quadratic(A, torch.zeros(8, dtype=D)), quad_loss, ORIGIN, sigma=sigma, samples=n, seed=3)
    expected = 0.5 * sigma ** 2 * float(EIGS.sum())
    assert abs(r.sharpness - expected) < 4 * r.stderr
    # Var(½εᵀAε) = ½σ⁴·tr(A²) for ε ~ N(0, σ²I): the reported stderr has the right size.
    theory = sigma ** 2 * math.sqrt(float((EIGS ** 2).sum()) / 2) / math.sqrt(n)
    assert 0.8 < r.stderr / theory < 1.2
    assert r.values.shape == (n,) and r.loss == 0.0


@pytest.mark.parametrize("scale", ["element", "filter", "layer"])
def test_average_sharpness_scaled_noise(scale):
    # ε_i = σ·z_i·S_i: E[½(x+ε)ᵀA(x+ε)] − ½xᵀAx = ½σ²·Σ_i A_ii·S_i².
    A, x, sigma, n = spd(), point(), 0.2, 400
    W, b = x[:6].view(2, 3), x[6:]
    S = {"element": x.abs(),
         "filter": torch.cat([W.norm(dim=1).repeat_interleave(3), b.norm().expand(2)]),
         "layer": torch.cat([W.norm().expand(6), b.norm().expand(2)])}[scale]
    r = average_sharpness(Quadratic(A, x), quad_loss, ORIGIN, sigma=sigma, samples=n, scale=scale, seed=5)
    expected = 0.5 * sigma ** 2 * float((A.diagonal() * S ** 2).sum())
    assert abs(r.sharpness - expected) < 4 * r.stderr


# -- m-sharpness -----------------------------------------------------------------------------


def test_m_sharpness():
    A, x = spd(), point()
    centers = torch.randn(8, 8, generator=torch.Generator().manual_seed(7), dtype=D)
    model = Quadratic(A, x)
    kw = dict(rho=0.2, steps=30, step_size=0.2)
    full = worst_case_sharpness(model, quad_loss, centers, **kw)
    assert m_sharpness(model, quad_loss, centers, m=8, **kw).sharpness == full.sharpness
    r = m_sharpness(model, quad_loss, centers, m=2, **kw)
    per_chunk = [worst_case_sharpness(model, quad_loss, c, **kw).sharpness for c in centers.split(2)]
    assert r.values.tolist() == per_chunk and r.sizes.tolist() == [2] * 4
    assert r.sharpness == pytest.approx(np.mean(per_chunk), rel=1e-14)
    assert r.sharpness >= full.sharpness  # a max of a mean is at most the mean of the maxima
    # Batches as given (m=None) from a list of batches; the average is weighted by batch size.
    r = m_sharpness(model, quad_loss, [(centers[:2],), (centers[2:],)], **kw)
    assert r.sizes.tolist() == [2, 6] and r.sharpness == pytest.approx((2 * r.values[0] + 6 * r.values[1]) / 8)


def test_split_batch_structures():
    x, y = torch.arange(10.0).view(5, 2), torch.arange(5)
    chunks = split_batch((x, y, "extra"), 2)
    assert [c[0].shape[0] for c in chunks] == [2, 2, 1] and chunks[-1][2] == "extra"
    chunks = split_batch({"input_ids": x, "labels": y}, 3)
    assert torch.equal(chunks[1]["labels"], y[3:])


# -- robustness ------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, dropout: float = 0.0, bn: bool = False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)
        self.bn = nn.BatchNorm1d(16) if bn else nn.Identity()
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def classification(n: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=D)
    return x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()


def ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def mlp(seed: int = 0, **kw) -> MLP:
    torch.manual_seed(seed)
    return MLP(**kw).to(D)


def test_random_corruptions_have_the_exact_norm():
    like = [torch.zeros(3, 4, dtype=D), torch.zeros(5, dtype=D)]
    gen = generator(torch.device("cpu"), 0)
    flat = lambda a: torch.cat([t.flatten() for t in a])  # noqa: E731
    for _ in range(5):
        sphere = flat(random_in_ball(like, [None, None], 0.3, 2.0, gen, boundary=True))
        assert float(sphere.norm()) == pytest.approx(0.3, rel=1e-14)
        v = flat(random_in_ball(like, [None, None], 0.3, math.inf, gen, boundary=True))
        assert torch.equal(v.abs(), torch.full_like(v, 0.3))
        assert float(flat(random_in_ball(like, [None, None], 0.3, 2.0, gen)).norm()) <= 0.3 + 1e-15
        assert float(flat(random_in_ball(like, [None, None], 0.3, math.inf, gen)).abs().max()) <= 0.3


def test_corruption_robustness_table():
    model, data = mlp(), classification()
    budgets = {2: [0.0, 0.1, 0.5, 2.0], "inf": [0.0, 0.01, 0.05]}
    table = corruption_robustness(model, ce, data, budgets, metric_fn=accuracy, samples=3, steps=5)
    with torch.no_grad():
        clean_loss = float(ce(model.eval(), data))
        clean_acc = float((model(data[0]).argmax(-1) == data[1]).double().mean())
    assert table.clean_loss == pytest.approx(clean_loss, rel=1e-14) and table.clean_metric == clean_acc
    assert len(table.rows) == 7 * 2
    for row in table.rows:
        if row["budget"] == 0.0:  # no corruption at all: the clean numbers exactly
            assert row["loss"] == table.clean_loss and row["metric"] == clean_acc and row["metric_change"] == 0
        if row["kind"] == "random":
            assert row["perturbation_norm"] == pytest.approx(row["absolute_budget"], rel=1e-12)
            assert row["loss_stderr"] is not None
        else:
            assert row["perturbation_norm"] <= row["absolute_budget"] * (1 + 1e-12)
    pairs = zip(table.rows[0::2], table.rows[1::2])
    for random, adversarial in pairs:
        assert (random["kind"], adversarial["kind"]) == ("random", "adversarial")
        assert adversarial["loss"] >= random["loss"]
    assert table.rows[-1]["loss"] > table.clean_loss
    markdown = table.to_markdown()
    assert markdown.count("\n") == 2 + 14 and "| clean |" in markdown
    # Relative budgets are fractions of ‖w‖_p.
    rel = corruption_robustness(model, ce, data, [0.05], kinds="random", relative=True)
    norm = float(torch.cat([p.detach().flatten() for p in model.parameters()]).norm())
    assert rel.rows[0]["absolute_budget"] == pytest.approx(0.05 * norm, rel=1e-12)
    assert rel.to_dict()["rows"][0]["metric"] is None


def test_perturbation_curve():
    model, data = mlp(), classification()
    curve = perturbation_curve(model, ce, data, radii=[0.0, 0.01, 0.1, 1.0], samples=4, steps=5)
    assert curve.random_loss[0] == curve.clean_loss == curve.adversarial_loss[0]
    assert np.all(curve.adversarial_loss >= curve.random_loss)
    assert np.all(curve.random_stderr[1:] > 0) and len(curve.rows()) == 4
    one = perturbation_curve(model, ce, data, radii=[0.1], samples=1, steps=2)
    assert one.to_dict()["random_stderr"] == [None]
    assert perturbation_curve(model, ce, data, radii=[0.1], relative=True, samples=1, steps=1).radii[0] > 0.1


# -- the model is left alone -----------------------------------------------------------------


DIAGNOSTICS = {
    "worst_case": lambda m, d, **kw: worst_case_sharpness(m, ce, d, steps=2, init="random", scale="filter", **kw),
    "average": lambda m, d, **kw: average_sharpness(m, ce, d, samples=2, scale="filter", **kw),
    "m_sharpness": lambda m, d, **kw: m_sharpness(m, ce, d, m=16, steps=1, **kw),
    "robustness": lambda m, d, **kw: corruption_robustness(m, ce, d, [0.1], metric_fn=accuracy, steps=2, **kw),
    "curve": lambda m, d, **kw: perturbation_curve(m, ce, d, radii=[0.1], samples=2, steps=2, **kw),
}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", sorted(DIAGNOSTICS))
def test_model_untouched(name, mode):
    model, data = mlp(dropout=0.2, bn=True), classification()
    model.train()
    model.fc2.eval()  # mixed flags must come back as they were
    model.fc1.bias.requires_grad_(False)
    check_untouched(DIAGNOSTICS[name], model, data, mode)


BAD = [
    (worst_case_sharpness, dict(rho=-0.1), "rho"),
    (worst_case_sharpness, dict(steps=0), "steps"),
    (worst_case_sharpness, dict(norm=3), "norm"),
    (worst_case_sharpness, dict(norm="l1"), "norm"),
    (worst_case_sharpness, dict(step_size=0.0), "step_size"),
    (worst_case_sharpness, dict(init="gaussian"), "init"),
    (worst_case_sharpness, dict(scale="layer"), "scale"),
    (worst_case_sharpness, dict(params="nothing-matches"), "params"),
    (average_sharpness, dict(samples=0), "samples"),
    (average_sharpness, dict(sigma=-1.0), "sigma"),
    (average_sharpness, dict(scale="matrix"), "scale"),
    (m_sharpness, dict(m=0), "m"),
    (m_sharpness, dict(rho=float("nan")), "rho"),
    (corruption_robustness, dict(budgets=[]), "budgets"),
    (corruption_robustness, dict(budgets=None), "budgets"),
    (corruption_robustness, dict(budgets={2: []}), "budgets"),
    (corruption_robustness, dict(budgets=[-0.1]), "budgets"),
    (corruption_robustness, dict(budgets=[0.1], norm=1), "norm"),
    (corruption_robustness, dict(budgets=[0.1], samples=0), "samples"),
    (corruption_robustness, dict(budgets=[0.1], kinds=["worst"]), "kinds"),
    (corruption_robustness, dict(budgets=[0.1], metric_fn="accuracy"), "metric_fn"),
    (perturbation_curve, dict(radii=[]), "radii"),
    (perturbation_curve, dict(radii=[-1.0]), "radii"),
    (perturbation_curve, dict(radii=0.1), "radii"),
    (perturbation_curve, dict(steps=0), "steps"),
]


@pytest.mark.parametrize("fn,kwargs,name", BAD, ids=[f"{f.__name__}-{n}-{i}" for i, (f, _, n) in enumerate(BAD)])
def test_bad_arguments_are_refused_and_leave_the_model_alone(fn, kwargs, name):
    model, data = mlp(), classification()
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        fn(model, ce, data, **kwargs)
    assert_untouched(model, before)
