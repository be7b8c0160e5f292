"""Every method's step against its closed form on L(x) = ½xᵀAx, in float64 (DESIGN.md §8.1).

The expected values are written from the formulas in DESIGN.md §3 on the flat vector ``x``,
independently of the library's kernels.
"""

from __future__ import annotations

import math

import pytest
import torch

import flatminima as fm
from helpers import Quadratic

LR = 0.1
TOL = dict(rtol=0, atol=1e-10)

# Parameter groups of the flat vector x = (W[0,:], W[1,:], b) for each granularity.
GROUPS = {
    "model": [list(range(8))],
    "layer": [list(range(6)), [6, 7]],
    "filter": [[0, 1, 2], [3, 4, 5], [6, 7]],
    "element": [[i] for i in range(8)],
}


def group_norm(v: torch.Tensor, granularity: str) -> torch.Tensor:
    out = torch.empty_like(v)
    for idx in GROUPS[granularity]:
        out[idx] = v[idx].norm()
    return out


def group_size(granularity: str) -> torch.Tensor:
    out = torch.empty(8, dtype=torch.float64)
    for idx in GROUPS[granularity]:
        out[idx] = len(idx)
    return out


def run(method: str, n_steps: int = 1, model: Quadratic | None = None, base=None, **hp) -> tuple[Quadratic, torch.Tensor]:
    model = model or Quadratic()
    x0 = model.flat().detach().clone()
    base = base or torch.optim.SGD(model.parameters(), lr=LR)
    opt = fm.create(method, base, **hp)
    for _ in range(n_steps):
        opt.step(model.closure())
    return model, x0


def sam_eps(g: torch.Tensor, rho: float, p: float) -> torch.Tensor:
    if p == 2:
        return rho * g / g.norm()
    if p == math.inf:
        return rho * g.sign()
    if p == 1:
        e = torch.zeros_like(g)
        j = g.abs().argmax()
        e[j] = rho * g[j].sign()
        return e
    q = p / (p - 1)
    return rho * g.sign() * g.abs() ** (q - 1) / torch.linalg.vector_norm(g, q) ** (q - 1)


@pytest.mark.parametrize("p", [2, "inf", 1, 3.0, 1.5])
def test_sam(p):
    model, x = run("sam", rho=0.05, norm=p)
    A = model.A
    pv = math.inf if p == "inf" else float(p)
    expected = x - LR * A @ (x + sam_eps(A @ x, 0.05, pv))
    torch.testing.assert_close(model.flat().detach(), expected, **TOL)


def test_sam_per_tensor_normalization():
    """SAM-LoRA's separate normalization: ε_W = ρ g_W/‖g_W‖, ε_b = ρ g_b/‖g_b‖ (seed 000)."""
    model, x = run("sam", rho=0.05, normalization="per_tensor")
    A = model.A
    g = A @ x
    eps = torch.cat([0.05 * g[:6] / g[:6].norm(), 0.05 * g[6:] / g[6:].norm()])
    torch.testing.assert_close(model.flat().detach(), x - LR * A @ (x + eps), **TOL)


def test_sam_ascent_weight_decay():
    model = Quadratic()
    base = torch.optim.SGD(model.parameters(), lr=LR, weight_decay=0.1)
    model, x = run("sam", model=model, base=base, rho=0.05, ascent_weight_decay=True)
    A = model.A
    g_ascent = A @ x + 0.1 * x
    expected = x - LR * (A @ (x + 0.05 * g_ascent / g_ascent.norm()) + 0.1 * x)
    torch.testing.assert_close(model.flat().detach(), expected, **TOL)


def test_sam_default_excludes_weight_decay_from_ascent():
    model = Quadratic()
    base = torch.optim.SGD(model.parameters(), lr=LR, weight_decay=0.1)
    model, x = run("sam", model=model, base=base, rho=0.05)
    A = model.A
    g = A @ x
    torch.testing.assert_close(model.flat().detach(), x - LR * (A @ (x + 0.05 * g / g.norm()) + 0.1 * x), **TOL)


@pytest.mark.parametrize("granularity", ["element", "filter"])
def test_asam(granularity):
    model, x = run("asam", rho=0.5, eta=0.01, granularity=granularity)
    A = model.A
    g = A @ x
    T = (x.abs() if granularity == "element" else group_norm(x, "filter")) + 0.01
    eps = 0.5 * T**2 * g / (T * g).norm()
    torch.testing.assert_close(model.flat().detach(), x - LR * A @ (x + eps), **TOL)


def test_layer_sam():
    model, x = run("layersam", rho=0.05)
    A = model.A
    g = A @ x
    T = group_norm(x, "layer") / group_norm(g, "layer")
    eps = 0.05 * T**2 * g / (T * g).norm()
    torch.testing.assert_close(model.flat().detach(), x - LR * A @ (x + eps), **TOL)


def gasam_scale(x, g, kind, granularity):
    W, G, n_i = group_norm(x, granularity), group_norm(g, granularity), group_size(granularity)
    return {
        "gradient_strength": n_i.sqrt() / (G * math.sqrt(8)),
        "one": torch.ones(8, dtype=torch.float64),
        "w_over_g": W / G,
        "inv_g": 1 / G,
        "w_over_sqrt_n": W / n_i.sqrt(),
        "w": W,
    }[kind]


def gasam_expected(A, x, eps, steps, p, T, step_size=1.5):
    """GA-SAM eqs. 14–18 on the flat vector."""
    eta = step_size * eps / steps
    g = A @ x
    grads, a = [g], torch.zeros_like(x)
    for _ in range(steps):
        gk = grads[-1]
        u = eta * T**2 * gk / (T * gk).norm() if p == 2 else eta * T * gk.sign()
        a = a + u
        if p == 2:
            r = (a / T).norm()
            a = a * min(r, eps) / r
        else:
            a = T * torch.clamp(a / T, -eps, eps)
        grads.append(A @ (x + a))
    return x - LR * torch.stack(grads).mean(0)


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("p", [2, "inf"])
def test_gasam_multistep(steps, p):
    model, x = run("gasam", epsilon=0.02, steps=steps, norm=p)
    A = model.A
    pv = 2 if p == 2 else math.inf
    T = gasam_scale(x, A @ x, "gradient_strength", "layer")
    torch.testing.assert_close(model.flat().detach(), gasam_expected(A, x, 0.02, steps, pv, T), **TOL)


@pytest.mark.parametrize("granularity", ["model", "layer", "filter", "element"])
@pytest.mark.parametrize("kind", ["gradient_strength", "one", "w_over_g", "inv_g", "w_over_sqrt_n", "w"])
def test_gasam_scales(kind, granularity):
    """GA-SAM's Table 2 variants of T are scale choices, at every granularity."""
    model, x = run("gasam", epsilon=0.02, steps=2, scale=kind, granularity=granularity)
    A = model.A
    T = gasam_scale(x, A @ x, kind, granularity)
    torch.testing.assert_close(model.flat().detach(), gasam_expected(A, x, 0.02, 2, 2, T), **TOL)


def test_gasam_k1_is_mean_of_clean_and_projected_gradient():
    """DESIGN.md §8: GA-SAM K=1 is x − η·½(Ax + A(x+a₁)), with a₁ on the ε-sphere (η=1.5ε > ε)."""
    model, x = run("gasam", epsilon=0.02, steps=1)
    A = model.A
    g = A @ x
    T = gasam_scale(x, g, "gradient_strength", "layer")
    a1 = T**2 * g / (T * g).norm()  # direction with ‖T⁻¹a₁‖ = 1
    a1 = 0.02 * a1 / (a1 / T).norm()
    torch.testing.assert_close(model.flat().detach(), x - LR * 0.5 * (g + A @ (x + a1)), **TOL)


def test_gasam_start_step():
    model, x = run("gasam", steps=1, start_step=1)
    torch.testing.assert_close(model.flat().detach(), x - LR * model.A @ x, **TOL)


@pytest.mark.parametrize("steps", [1, 2])
def test_gasam_does_not_perturb_a_group_whose_clean_gradient_is_zero(steps):
    """LoRA's A factor while B = 0 has a zero clean gradient: T_A = √(n_A/n)/‖g_A‖ is undefined, and
    a finite stand-in (1/1e-12) let the K = 2 ascent, where g_A is no longer zero, move A by ~1e12·η.
    Such a group gets T = 0: A stays at w in every perturbed pass; B moves within ‖T⁻¹ε‖₂ ≤ ε."""
    torch.manual_seed(0)
    M, t, c = torch.randn(2, 3, dtype=torch.float64), 0.7, torch.randn(2, dtype=torch.float64)
    a = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    seen = []

    def closure():
        seen.append((a.detach().clone(), b.detach().clone()))
        loss = 0.5 * (b @ M @ a - t) ** 2 + 0.5 * (b - c).square().sum()
        loss.backward()
        return loss.detach()

    a0 = a.detach().clone()
    opt = fm.GASAM(torch.optim.SGD([a, b], lr=LR), epsilon=0.02, steps=steps, granularity="layer")
    opt.step(closure)
    assert len(seen) == steps + 1
    g_b = (seen[0][1] - c).norm()  # ∂L/∂b at b = 0 is b − c = −c (the first term's factor b @ M @ a is 0)
    T_b = math.sqrt(2 / 5) / g_b
    for a_k, b_k in seen[1:]:
        assert torch.equal(a_k, a0)
        assert 0 < (b_k / T_b).norm() <= 0.02 * (1 + 1e-12)


def test_multistep_sam_is_gasam_with_unit_scale():
    model, x = run("multistepsam", epsilon=0.05, steps=2)
    A = model.A
    T = torch.ones(8, dtype=torch.float64)
    torch.testing.assert_close(model.flat().detach(), gasam_expected(A, x, 0.05, 2, 2, T), **TOL)


def test_looksam():
    model, x = run("looksam", n_steps=3, rho=0.05, k=2, alpha=0.7)
    A = model.A
    # step 0: SAM step, store g_v
    g = A @ x
    gs = A @ (x + 0.05 * g / g.norm())
    gv = gs - (g @ gs) / (g @ g) * g
    x = x - LR * gs
    # step 1: reuse
    g = A @ x
    x = x - LR * (g + 0.7 * g.norm() / gv.norm() * gv)
    # step 2: SAM step again
    g = A @ x
    x = x - LR * A @ (x + 0.05 * g / g.norm())
    torch.testing.assert_close(model.flat().detach(), x, **TOL)


@pytest.mark.parametrize("p, sam", [(1.0, True), (0.0, False)])
def test_stochastic_sam_extremes(p, sam):
    model, x = run("stochasticsam", rho=0.05, p=p)
    A = model.A
    g = A @ x
    expected = x - LR * A @ (x + 0.05 * g / g.norm()) if sam else x - LR * g
    torch.testing.assert_close(model.flat().detach(), expected, **TOL)


def test_stochastic_sam_schedule_and_seed():
    """p(t) as a callable; the coin is reproducible from the seed and differs between seeds."""
    def fired(seed):
        model = Quadratic()
        opt = fm.StochasticSAM(torch.optim.SGD(model.parameters(), lr=LR), p=lambda t: 0.5, seed=seed)
        calls = []
        for _ in range(40):
            n = [0]
            def closure(backward=True):
                n[0] += 1
                return model.closure()(backward)
            opt.step(closure)
            calls.append(n[0] == 2)
        return calls

    a, b, c = fired(0), fired(0), fired(1)
    assert a == b and a != c
    assert 10 < sum(a) < 30


def test_aesam_threshold():
    """Step 0 always fires (μ = ‖g‖², σ = 0); later steps follow ‖g‖² ≥ μ_t + c_t σ_t."""
    model = Quadratic()
    opt = fm.AESAM(torch.optim.SGD(model.parameters(), lr=LR), rho=0.05, decay=0.5, c_start=0.0, c_end=0.0)
    A = model.A
    x = model.flat().detach().clone()
    mean = var = None
    for _step in range(4):
        g = A @ x
        sq = float(g @ g)
        if mean is None:
            mean, var = sq, 0.0
        else:
            mean = 0.5 * mean + 0.5 * sq
            var = 0.5 * var + 0.5 * (sq - mean) ** 2
        fire = sq >= mean + 0.0 * math.sqrt(var)
        x = x - LR * (A @ (x + 0.05 * g / g.norm()) if fire else g)
        opt.step(model.closure())
        torch.testing.assert_close(model.flat().detach(), x, **TOL)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.75])
def test_ssam_fisher_mask(sparsity):
    model, x = run("ssam", rho=0.05, sparsity=sparsity, mask="fisher")
    A = model.A
    g = A @ x
    keep = math.ceil((1 - sparsity) * 8)
    m = torch.zeros(8, dtype=torch.float64)
    m[(g**2).topk(keep).indices] = 1
    eps = 0.05 * m * g / (m * g).norm()
    torch.testing.assert_close(model.flat().detach(), x - LR * A @ (x + eps), **TOL)


def test_ssam_random_mask_keeps_sparsity_and_moves():
    model = Quadratic()
    opt = fm.SSAM(torch.optim.SGD(model.parameters(), lr=LR), sparsity=0.5, mask="random", interval=1, fraction=0.5)
    masks = []
    for _ in range(4):
        opt.step(model.closure())
        masks.append(torch.cat([opt.method_state[p]["ssam.mask"].flatten() for p in (model.W, model.b)]))
    assert all(int(m.sum()) == 4 for m in masks)
    assert any(not torch.equal(a, b) for a, b in zip(masks, masks[1:]))


def test_random_search_sam_takes_the_worst_candidate():
    model = Quadratic()
    opt = fm.RandomSearchSAM(torch.optim.SGD(model.parameters(), lr=LR), rho=0.3, candidates=5)
    A, x = model.A, model.flat().detach().clone()
    params, gidx = opt.scoped_params(with_grad=False)
    deltas = [torch.cat([d.flatten() for d in opt.perturbation._delta(opt, params, gidx, j)]) for j in range(5)]
    for d in deltas:
        torch.testing.assert_close(d.norm(), torch.tensor(0.3, dtype=torch.float64), **TOL)
    losses = [0.5 * (x + d) @ A @ (x + d) for d in deltas]
    best = deltas[int(torch.stack(losses).argmax())]
    assert max(losses) > 0.5 * x @ A @ x
    forwards = []

    def closure(backward=True):
        forwards.append(backward)
        return model.closure()(backward)

    loss = opt.step(closure)
    assert forwards == [False] * 6 + [True]  # clean + 5 candidates forward-only, one backward
    torch.testing.assert_close(loss, 0.5 * x @ A @ x, **TOL)
    torch.testing.assert_close(model.flat().detach(), x - LR * A @ (x + best), **TOL)


def test_per_group_strength():
    """Hyperparameters live in param_groups: ρ per group, norm over all groups."""
    model = Quadratic()
    base = torch.optim.SGD([{"params": [model.W], "rho": 0.1}, {"params": [model.b]}], lr=LR)
    model, x = run("sam", model=model, base=base, rho=0.05)
    A = model.A
    g = A @ x
    rho = torch.tensor([0.1] * 6 + [0.05] * 2, dtype=torch.float64)
    torch.testing.assert_close(model.flat().detach(), x - LR * A @ (x + rho * g / g.norm()), **TOL)
