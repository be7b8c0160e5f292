"""GSAM, WSAM, VaSSO, FriendlySAM, Fisher-SAM, GAM and C-Flat against their papers' update rules.

On L(x) = ½xᵀAx (``helpers.Quadratic``: A a fixed SPD 8×8 matrix, x split into W (2×3) and b (2),
float64) every gradient is explicit: ∇L(x + ε) = A(x + ε), and a Hessian-vector product is A·v.
The expected iterates are written here with plain torch ops on the flat vector, from the papers'
formulas (and, where they fix a convention the paper leaves open, the authors' code), never from
the library. The registry-wide contract (zero strength, dtypes, resume of the default
configurations…) is tests/test_methods.py's.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import flatminima as fm
from helpers import InfGrad, Quadratic

LR, MU = 0.1, 0.9
TOL = {"rtol": 1e-12, "atol": 1e-14}
BLOCKS = (slice(0, 6), slice(6, 8))  # W and b in the flat vector


def unit(v: torch.Tensor, per_tensor: bool = False) -> torch.Tensor:
    """v/‖v‖ over the whole vector, or over each parameter tensor on its own."""
    if not per_tensor:
        return v / v.norm()
    out = torch.empty_like(v)
    for s in BLOCKS:
        out[s] = v[s] / v[s].norm()
    return out


class HandSGD:
    """torch.optim.SGD(lr, momentum=μ): b ← μ·b + d (b₀ = d), x ← x − lr·b."""

    def __init__(self):
        self.lr, self.buf = LR, None

    def __call__(self, x, d):
        self.buf = d.clone() if self.buf is None else MU * self.buf + d
        return x - self.lr * self.buf


class HandAdamW:
    """AdamW (Loshchilov & Hutter): x ← x(1 − lr·λ) − lr·m̂/(√v̂ + ε)."""

    def __init__(self, lr=0.05, betas=(0.9, 0.999), eps=1e-8, wd=0.1):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, wd
        self.t, self.m, self.v = 0, 0.0, 0.0

    def __call__(self, x, d):
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * d
        self.v = self.b2 * self.v + (1 - self.b2) * d * d
        m_hat, v_hat = self.m / (1 - self.b1**self.t), self.v / (1 - self.b2**self.t)
        return x * (1 - self.lr * self.wd) - self.lr * m_hat / (v_hat.sqrt() + self.eps)


BASES = {
    "sgd": (lambda m: torch.optim.SGD(m.parameters(), lr=LR, momentum=MU), HandSGD),
    "adamw": (lambda m: torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1), HandAdamW),
}


def run(name, n, base="sgd", **hp):
    """The library's iterates x₀..xₙ of method ``name`` from Quadratic()'s start, and the model/optimizer."""
    model = Quadratic()
    opt = fm.create(name, BASES[base][0](model), **hp)
    xs = [model.flat().detach().clone()]
    for _ in range(n):
        opt.step(model.closure())
        xs.append(model.flat().detach().clone())
    return xs, model, opt


def hand(n, descent, base="sgd", after=None):
    """Expected iterates x₀..xₙ: ``x ← base(x, descent(A, x, t))``, then ``after(A, x_old, x_new)``."""
    model = Quadratic()
    A, x = model.A, model.flat().detach().clone()
    step = BASES[base][1]()
    xs = [x]
    for t in range(n):
        new = step(x, descent(A, x, t))
        xs.append(new if after is None else after(A, x, new))
        x = xs[-1]
    return xs


def assert_iterates(got, expected):
    assert len(got) == len(expected)
    for t, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, t=t: f"iterate {t}: {m}")
    assert not torch.equal(got[-1], got[0])


def sam_pair(A, x, rho):
    """g = Ax and g_a = ∇L(x + ρ·g/‖g‖) (SAM's perturbed gradient)."""
    g = A @ x
    return g, A @ (x + rho * unit(g))


# -- GSAM (Zhuang et al. 2022, Alg. 1): descend g_a − α·g⊥, g⊥ = g − (⟨g, g_a⟩/‖g_a‖²)·g_a --------

@pytest.mark.parametrize("n", [1, 3])
def test_gsam_closed_form(n):
    def descent(A, x, t):
        g, ga = sam_pair(A, x, 0.05)
        return ga - 0.4 * (g - (g @ ga) / (ga @ ga) * ga)

    assert_iterates(run("gsam", n, rho=0.05, alpha=0.4)[0], hand(n, descent))


# -- WSAM (Yue et al. 2023, eq. 6 and Alg. 1): α = γ/(1 − γ) -------------------------------------

@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_wsam_coupled_descends_g_plus_alpha_sharpness(base):
    alpha = 0.8 / 0.2

    def descent(A, x, t):
        g, ga = sam_pair(A, x, 0.05)
        return g + alpha * (ga - g)

    xs = run("wsam", 3, base, rho=0.05, gamma=0.8, decouple=False)[0]
    assert_iterates(xs, hand(3, descent, base))


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_wsam_decoupled_base_sees_only_the_clean_gradient(base):
    """The base optimizer (its momentum, Adam's moments) steps on g; then w ← w − lr·α·(g_a − g)."""
    alpha, lr = 0.8 / 0.2, (LR if base == "sgd" else 0.05)

    def after(A, x_old, x_new):
        g, ga = sam_pair(A, x_old, 0.05)
        return x_new - lr * alpha * (ga - g)

    xs, _, opt = run("wsam", 3, base, rho=0.05, gamma=0.8, decouple=True)
    assert_iterates(xs, hand(3, lambda A, x, t: A @ x, base, after))
    if base == "adamw":  # Adam's first moment: the EMA of the clean gradients at the iterates alone
        A, adam = Quadratic().A, HandAdamW()
        for x in xs[:-1]:
            adam(x, A @ x)
        got = torch.cat([opt.state[p]["exp_avg"].flatten() for p in opt.param_groups[0]["params"]])
        torch.testing.assert_close(got, adam.m, **TOL)


@pytest.mark.parametrize("name, hp", [("gsam", {"alpha": 0.0}), ("wsam", {"gamma": 0.5, "decouple": False})])
def test_reduces_to_sam_bit_for_bit(name, hp):
    """GSAM with α = 0 descends g_a; coupled WSAM with γ = ½ (α = 1) descends g + (g_a − g) = g_a."""
    got = run(name, 3, rho=0.05, **hp)[0]
    assert all(torch.equal(a, b) for a, b in zip(got, run("sam", 3, rho=0.05)[0]))


# -- VaSSO (Li & Giannakis 2023, Alg. 1): d_t = (1 − θ)·d_{t−1} + θ·g_t, d_0 = g_0 (authors' code) ---

@pytest.mark.parametrize("normalization", ["global", "per_tensor"])
def test_vasso_three_steps(normalization):
    theta, d = 0.4, []

    def descent(A, x, t):
        g = A @ x
        d.append(g if not d else (1 - theta) * d[-1] + theta * g)
        return A @ (x + 0.05 * unit(d[-1], normalization == "per_tensor"))

    expected = hand(3, descent)
    xs, model, opt = run("vasso", 3, rho=0.05, theta=theta, normalization=normalization)
    assert_iterates(xs, expected)
    ema = torch.cat([opt.method_state[p]["vasso.ema"].flatten() for p in (model.W, model.b)])
    torch.testing.assert_close(ema, d[-1], **TOL)


# -- FriendlySAM (Li et al. 2024, Alg. 1): d_t = g_t − σ·m_{t−1}, m_t = λ·m_{t−1} + (1 − λ)·g_t;
#    authors' code: m_0 = g_0 and the first ascent follows g_0 -----------------------------------

@pytest.mark.parametrize("normalization", ["global", "per_tensor"])
def test_friendlysam_three_steps(normalization):
    sigma, lmbda, m = 0.7, 0.6, []

    def descent(A, x, t):
        g = A @ x
        d = g if not m else g - sigma * m[-1]
        m.append(g if not m else lmbda * m[-1] + (1 - lmbda) * g)
        return A @ (x + 0.05 * unit(d, normalization == "per_tensor"))

    expected = hand(3, descent)
    xs, model, opt = run("fsam", 3, rho=0.05, sigma=sigma, lmbda=lmbda, normalization=normalization)
    assert isinstance(opt, fm.FriendlySAM)
    assert_iterates(xs, expected)
    mom = torch.cat([opt.method_state[p]["friendlysam.momentum"].flatten() for p in (model.W, model.b)])
    torch.testing.assert_close(mom, m[-1], **TOL)


# -- Fisher-SAM (Kim et al. 2022, eq. 9): ε = ρ·f⁻¹g/√(gᵀf⁻¹g), f = 1 + η·g² --------------------

@pytest.mark.parametrize("n", [1, 2])
def test_fishersam_closed_form(n):
    def descent(A, x, t):
        g = A @ x
        f_inv = 1.0 / (1.0 + 0.5 * g * g)
        return A @ (x + 0.05 * f_inv * g / torch.sqrt(g @ (f_inv * g)))

    assert_iterates(run("fishersam", n, rho=0.05, eta=0.5)[0], hand(n, descent))


# -- GAM (Zhang et al. 2023, Alg. 1) and C-Flat (Bian et al. 2024, Alg. 1) ------------------------

def flatness_grads(A, x, rho, norm_rho):
    """g₀ = Ax; g₁ at SAM's point; ε₂ = ρ'·∇‖∇L‖/‖∇‖∇L‖‖ with ∇‖∇L‖ = Hg/‖g‖ = A·g₀/‖g₀‖; g₂ at
    x + ε₂; g₃ at x + ε₂ + ρ·g₂/‖g₂‖."""
    g0 = A @ x
    g1 = A @ (x + rho * unit(g0))
    e2 = norm_rho * unit(A @ g0)
    g2 = A @ (x + e2)
    return g0, g1, g2, A @ (x + e2 + rho * unit(g2))


@pytest.mark.parametrize("n", [1, 3])
def test_gam_closed_form(n):
    b1, b2, b3, gamma = 0.7, -0.5, 1.2, 0.3

    def descent(A, x, t):
        g0, g1, g2, g3 = flatness_grads(A, x, 0.1, 0.02)
        d, m = b1 * g1 + b3 * g3, g0 + abs(b2) * g2
        return d - gamma * (m - (m @ d) / (d @ d) * d)

    xs = run("gam", n, rho=0.1, norm_rho=0.02, grad_beta_1=b1, grad_beta_2=b2, grad_beta_3=b3, grad_gamma=gamma)[0]
    assert_iterates(xs, hand(n, descent))


def cflat_descent(A, x, rho, lamb):
    _, g1, g2, g3 = flatness_grads(A, x, rho, rho)
    return g1 + lamb * (g3 - g2)


@pytest.mark.parametrize("n", [1, 3])
def test_cflat_basic_closed_form(n):
    xs, _, opt = run("c-flat", n, rho=0.1, lamb=0.3)
    assert isinstance(opt, fm.CFlat)
    assert_iterates(xs, hand(n, lambda A, x, t: cflat_descent(A, x, 0.1, 0.3)))


PLUS = {"strategy": "plus", "rho": 0.1, "lamb": 0.3, "A": 2.0, "k": 1.0, "t0": 2.0, "cof": 1.0}  # fires T, T, F, F, T


def cflat_plus_expected(n):
    """C-Flat+ (official code): at step t ≥ 1, E = A/(1 + e^{−k(t − t0)}) − ‖g‖, A ← A − cof·E; the
    C-Flat step when E ≤ 0, else the base step on g. Returns the iterates, the firings and A."""
    state = {"A": PLUS["A"], "fired": []}

    def descent(A, x, t):
        g = A @ x
        energy = state["A"] / (1 + math.exp(-PLUS["k"] * (t + 1 - PLUS["t0"]))) - float(g.norm())
        state["A"] -= PLUS["cof"] * energy
        state["fired"].append(energy <= 0)
        return cflat_descent(A, x, PLUS["rho"], PLUS["lamb"]) if energy <= 0 else g

    xs = hand(n, descent)
    return xs, state["fired"], state["A"]


def test_cflat_plus_trigger_crosses_the_threshold():
    expected, fired, a = cflat_plus_expected(5)
    assert fired == [True, True, False, False, True]  # the case crosses the threshold both ways
    xs, _, opt = run("cflat", 5, **PLUS)
    assert_iterates(xs, expected)
    assert opt.trigger.A == pytest.approx(a, rel=1e-12)


# -- state: namespaced, nothing in the base optimizer's; resume; skipped steps --------------------

CASES = {
    "gsam": {"rho": 0.05, "alpha": 0.4},
    "wsam": {"rho": 0.05, "gamma": 0.8},
    "wsam-coupled": {"rho": 0.05, "gamma": 0.8, "decouple": False},
    "vasso": {"rho": 0.05, "theta": 0.4},
    "friendlysam": {"rho": 0.05, "sigma": 0.7, "lmbda": 0.6},
    "fishersam": {"rho": 0.05, "eta": 0.5},
    "gam": {"rho": 0.1, "norm_rho": 0.02},
    "cflat": {"rho": 0.1, "lamb": 0.3},
    "cflat-plus": PLUS,
}
KEYS = {"vasso": {"vasso.ema"}, "friendlysam": {"friendlysam.momentum"}}


def make(case, base="sgd"):
    model = Quadratic()
    return model, fm.create(case.split("-")[0], BASES[base][0](model), **CASES[case])


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_lives_under_namespaced_keys_only(case):
    model, opt = make(case)
    for _ in range(3):
        opt.step(model.closure())
    for p in model.parameters():
        assert set(opt.state[p]) == {"momentum_buffer"}  # the base optimizer's, nothing more
        assert set(opt.method_state.get(p, {})) == KEYS.get(case, set())
    assert all(set(s) == {"momentum_buffer"} for s in opt.state_dict()["state"].values())


def snapshot(model, opt):
    """Weights, the state dict (base and method state, step) and the live trigger's fields, copied."""
    return ([p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()),
            copy.deepcopy(vars(opt.trigger)))


def assert_same(a, b):
    (wa, sa, ta), (wb, sb, tb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(wa, wb))
    assert sa.keys() == sb.keys() and sa["flatminima"]["step"] == sb["flatminima"]["step"]
    assert ta == tb and sa["flatminima"]["trigger"] == sb["flatminima"]["trigger"]
    for own_a, own_b in ((sa["state"], sb["state"]), (sa["flatminima"]["state"], sb["flatminima"]["state"])):
        assert own_a.keys() == own_b.keys()
        for i in own_a:
            assert own_a[i].keys() == own_b[i].keys()
            assert all(torch.equal(torch.as_tensor(own_a[i][k]), torch.as_tensor(own_b[i][k])) for k in own_a[i])


@pytest.mark.parametrize("case, base", [("vasso", "sgd"), ("friendlysam", "sgd"), ("wsam", "adamw"),
                                        ("cflat-plus", "sgd"), ("gam", "sgd")])
def test_resume_mid_run_is_bit_identical(case, base):
    model, opt = make(case, base)
    for _ in range(2):
        opt.step(model.closure())
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for _ in range(3):
        opt.step(model.closure())
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model2, opt2 = make(case, base)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for _ in range(3):
        opt2.step(model2.closure())
    assert_same(snapshot(model, opt), snapshot(model2, opt2))


def explicit_step(model, opt, scaler=None, inf=None):
    """The explicit form under fp16 AMP: every backward scaled, ``scaler.step(opt)`` skips on inf;
    ``inf``: the pass (``"clean"`` or ``"perturbed"``) whose gradient gets an inf."""
    scale = scaler.scale if scaler is not None else (lambda loss: loss)
    opt.zero_grad()
    scale(model(InfGrad.apply(model.flat()) if inf == "clean" else None)).backward()
    passes = 0
    for _ in opt.perturbations(scaler=scaler):
        passes += 1
        scale(model(InfGrad.apply(model.flat()) if inf == "perturbed" else None)).backward()
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    return passes


@pytest.mark.parametrize("case, where", [("vasso", "perturbed"), ("friendlysam", "perturbed"), ("wsam", "perturbed"),
                                         ("gam", "perturbed"), ("cflat-plus", "perturbed"), ("cflat-plus", "clean")])
def test_amp_skipped_step_commits_nothing(case, where):
    """An inf in a pass: GradScaler skips the step; weights, base and method state (EMA, decoupled
    WSAM's weight update, C-Flat+'s A, which an inf clean gradient would make inf) stay, the step
    is not counted, and the next step is the twin's second one."""
    model, opt = make(case)
    twin_model, twin = make(case)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    explicit_step(model, opt, scaler)
    explicit_step(twin_model, twin)
    before = snapshot(model, opt)
    assert explicit_step(model, opt, scaler, inf=where) > 0
    assert scaler.get_scale() == 2.0**9 and opt.step_count == 1
    assert_same(snapshot(model, opt), before)
    explicit_step(model, opt, scaler)
    explicit_step(twin_model, twin)
    assert_same(snapshot(model, opt), snapshot(twin_model, twin))


BAD = [
    ("gsam", {"alpha": -0.1}, "alpha"),
    ("gsam", {"alpha": 1.5}, "alpha"),
    ("wsam", {"gamma": 1.0}, "gamma"),
    ("wsam", {"decouple": "yes"}, "decouple"),
    ("vasso", {"theta": 0.0}, "theta"),
    ("vasso", {"theta": 1.5}, "theta"),
    ("friendlysam", {"lmbda": 1.0}, "lmbda"),
    ("friendlysam", {"sigma": -1.0}, "sigma"),
    ("fishersam", {"eta": -1.0}, "eta"),
    ("gam", {"norm_rho": -1.0}, "norm_rho"),
    ("gam", {"grad_gamma": -0.1}, "grad_gamma"),
    ("cflat", {"strategy": "x"}, "strategy"),
    ("cflat", {"lamb": -1.0}, "lamb"),
]


@pytest.mark.parametrize("name, hp, arg", BAD)
def test_bad_hyperparameters_raise_and_touch_nothing(name, hp, arg):
    model = Quadratic()
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MU)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=f"Invalid {arg}\\b") as info:
        fm.create(name, base, **hp)
    assert "expected" in str(info.value)
    assert [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups] == groups
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())) and not base.state
    fm.create(name, base)  # the base is still free to wrap
