"""The training-step engine (``fm.TrainStep``, DESIGN.md §4) against hand computations.

Everything runs on a small MLP in float64 unless the test is about a lower precision. Reference
gradients come from ``torch.func`` on the same module (``functional_call``), written from the
formulas of DESIGN.md §3/§4 and not from the library's kernels. "Exact restore" is checked by
recording, in a step pre-hook of the base optimizer, the weights and gradients it is handed.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import flatminima as fm
from helpers import InfGrad
from flatminima.engine import StepResult, TrainStep, record_unscaled

DT = torch.float64
LR = 0.1
RHO = 0.1
EXACT = dict(rtol=0.0, atol=0.0)
TIGHT = dict(rtol=1e-12, atol=1e-13)


# --------------------------------------------------------------------------------------------
# Fixtures





class Net(nn.Module):
    """Linear(4, 6) -> [BatchNorm1d] -> tanh -> Linear(6, 2), initialised from its own generator."""

    def __init__(self, seed: int = 0, dtype=DT, bn: bool = False, bn_momentum=0.1):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.norm = nn.BatchNorm1d(6, momentum=bn_momentum) if bn else None
        self.fc2 = nn.Linear(6, 2)
        self.to(dtype)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.7 * torch.randn(p.shape, generator=g, dtype=torch.float64))

    def forward(self, x):
        h = self.fc1(x)
        if self.norm is not None:
            h = self.norm(h)
        return self.fc2(torch.tanh(h))


def batch(seed: int, n: int = 6, dtype=DT):
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def mse(model, b):
    x, y = b
    out = model(x)
    return F.mse_loss(out.to(y.dtype) if out.dtype != y.dtype else out, y)


METHODS = {
    "base": lambda b: fm.Base(b),
    "sam": lambda b: fm.SAM(b, rho=RHO),
    "sam_inf": lambda b: fm.SAM(b, rho=0.02, norm="inf"),
    "gasam_k1": lambda b: fm.GASAM(b, epsilon=RHO, steps=1),
    "gasam_k2": lambda b: fm.GASAM(b, epsilon=RHO, steps=2),
    "looksam": lambda b: fm.LookSAM(b, rho=RHO, k=2, alpha=0.5),
    "looksam_k1": lambda b: fm.LookSAM(b, rho=RHO, k=1, alpha=0.5),
    "stochastic": lambda b: fm.StochasticSAM(b, rho=RHO, p=0.5, seed=3),
    "random_search": lambda b: fm.RandomSearchSAM(b, rho=RHO, candidates=3),
    "gsam": lambda b: fm.GSAM(b, rho=RHO, alpha=0.4),
    "wsam": lambda b: fm.WSAM(b, rho=RHO, gamma=0.8),
    "wsam_coupled": lambda b: fm.WSAM(b, rho=RHO, gamma=0.8, decouple=False),
    "vasso": lambda b: fm.VaSSO(b, rho=RHO, theta=0.4),
    "friendlysam": lambda b: fm.FriendlySAM(b, rho=RHO, sigma=0.7, lmbda=0.6),
    "fishersam": lambda b: fm.FisherSAM(b, rho=RHO, eta=0.5),
    "gam": lambda b: fm.GAM(b, rho=RHO, norm_rho=0.05),
    "cflat": lambda b: fm.CFlat(b, rho=RHO, lamb=0.3),
    "cflat_plus": lambda b: fm.CFlat(b, rho=RHO, lamb=0.3, strategy="plus", A=2.0, k=1.0, t0=2.0),
}


# The methods added with the ascent-direction and post-step axes: every TrainStep guarantee holds for them.
NEW_METHODS = ["gsam", "wsam", "wsam_coupled", "vasso", "friendlysam", "fishersam", "gam", "cflat", "cflat_plus"]


def build(method: str = "sam", *, momentum: float = 0.9, lr: float = LR, seed: int = 0, **net):
    model = Net(seed, **net)
    opt = METHODS[method](torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum))
    return model, opt


def clone_params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def named(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def buffers(model) -> list[torch.Tensor]:
    return [b.detach().clone() for b in model.buffers()]


def assert_same(xs, ys):
    xs, ys = list(xs), list(ys)
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.dtype == y.dtype and torch.equal(x, y), (x, y)


def assert_state_equal(a, b):
    """Deep, bitwise comparison of state_dicts."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), (a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (a.keys(), b.keys())
        for k in a:
            assert_state_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_state_equal(x, y)
    else:
        assert a == b, (a, b)


class Recorder:
    """Step pre-hook on the base optimizer: the weights and gradients each base step is handed."""

    def __init__(self, base: torch.optim.Optimizer):
        self.weights: list[list[torch.Tensor]] = []
        self.grads: list[list[torch.Tensor]] = []
        base.register_step_pre_hook(self)

    def __call__(self, opt, args, kwargs):
        params = [p for g in opt.param_groups for p in g["params"]]
        self.weights.append([p.detach().clone() for p in params])
        self.grads.append([p.grad.detach().clone() for p in params])


# Hand computations (torch.func on the module, float64) -----------------------------------------


def f_loss(model, params: dict, b):
    x, y = b
    return F.mse_loss(functional_call(model, params, (x,)), y)


def f_grad(model, params: dict, b) -> dict:
    return torch.func.grad(lambda p: f_loss(model, p, b))(params)


def mean_dicts(ds: list[dict]) -> dict:
    return {k: sum(d[k] for d in ds) / len(ds) for k in ds[0]}


def add(a: dict, b: dict, alpha: float = 1.0) -> dict:
    return {k: a[k] + alpha * b[k] for k in a}


def gnorm(d: dict) -> torch.Tensor:
    return torch.sqrt(sum((v * v).sum() for v in d.values()))


def sam_eps(g: dict, rho: float) -> dict:
    """SAM (DESIGN.md §3): ε = ρ·g/‖g‖₂ over all parameters."""
    n = gnorm(g)
    return {k: rho * v / n for k, v in g.items()}


def gasam_k1_eps(g: dict, eps: float) -> dict:
    """GA-SAM K=1, layer granularity: T_i = √(n_i/n)/‖g_i‖, u = η·T²g/‖Tg‖ with η = 1.5ε, then the
    projection onto ‖T⁻¹a‖₂ ≤ ε scales it back to a = ε·T²g/‖Tg‖."""
    n = sum(v.numel() for v in g.values())
    T = {k: math.sqrt(v.numel() / n) / v.norm() for k, v in g.items()}
    tg_norm = torch.sqrt(sum(((T[k] * v) ** 2).sum() for k, v in g.items()))
    return {k: eps * T[k] ** 2 * v / tg_norm for k, v in g.items()}


# --------------------------------------------------------------------------------------------
# Accumulation: reductions and hand computations


@pytest.mark.parametrize("accumulation", ["last", "full"])
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("method", ["base", "sam", "sam_inf", "gasam_k1", "gasam_k2", "looksam", "stochastic",
                                    "random_search", *NEW_METHODS])
def test_accumulating_copies_of_one_batch_is_the_single_batch_step(method, n, accumulation):
    m1, o1 = build(method)
    m2, o2 = build(method)
    single = TrainStep(m1, o1, mse, accumulation=accumulation)
    window = TrainStep(m2, o2, mse, accumulation=accumulation)
    for t in range(4):  # LookSAM k=2 covers SAM steps and reuse steps
        b = batch(t)
        r1, r2 = single([b]), window([b] * n)
        assert r1.loss.dtype == DT
        torch.testing.assert_close(r2.loss, r1.loss, **TIGHT)
        torch.testing.assert_close(clone_params(m2), clone_params(m1), **TIGHT)
    assert o1.step_count == o2.step_count == 4
    s1, s2 = o1.state_dict(), o2.state_dict()
    for i in s1["state"]:
        torch.testing.assert_close(s2["state"][i]["momentum_buffer"], s1["state"][i]["momentum_buffer"], **TIGHT)
    torch.testing.assert_close(s2["flatminima"]["state"], s1["flatminima"]["state"], **TIGHT)  # LookSAM's g_v


def penalty(model):
    """A smooth regularizer of the weights: R(w) = 0.3·‖fc1.weight‖² + 0.1·Σ fc2.bias."""
    return 0.3 * model.fc1.weight.square().sum() + 0.1 * model.fc2.bias.sum()


def f_penalty_grad(params: dict) -> dict:
    return {k: (0.6 * v if k == "fc1.weight" else torch.full_like(v, 0.1) if k == "fc2.bias" else torch.zeros_like(v))
            for k, v in params.items()}


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("method", ["base", "sam"])
def test_regularizer_is_added_once_per_pass_whatever_the_accumulation(method, n):
    """The objective is mean_i L_i(w) + R(w): R's gradient enters every pass once (at w for the
    clean pass, at w + ε for SAM's), never multiplied or divided by the micro-batch count."""
    model, opt = build(method, momentum=0.0)
    rec = Recorder(opt.base)
    mbs = [batch(20 + i) for i in range(n)]
    w = named(model)
    clean = add(mean_dicts([f_grad(model, w, b) for b in mbs]), f_penalty_grad(w))
    clean_loss = sum(f_loss(model, w, b) for b in mbs) / n + penalty(model).detach()
    if method == "base":
        descent = clean
    else:
        at = add(w, sam_eps(clean, RHO))
        descent = add(f_grad(model, at, mbs[-1]), f_penalty_grad(at))

    result = TrainStep(model, opt, mse, accumulation="last", regularizer=penalty)(mbs)

    torch.testing.assert_close(result.loss, clean_loss, **TIGHT)
    torch.testing.assert_close(rec.grads[0], list(descent.values()), **TIGHT)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("method", ["base", "sam"])
def test_regularizer_at_clean_adds_its_gradient_at_w_to_the_descent_gradient(method, n):
    """``regularizer_at="clean"``: ε comes from the data loss alone and the descent gradient is the
    method's plus ∇R(w), whatever the accumulation; the returned loss still includes R(w)."""
    model, opt = build(method, momentum=0.0)
    rec = Recorder(opt.base)
    mbs = [batch(30 + i) for i in range(n)]
    w = named(model)
    clean = mean_dicts([f_grad(model, w, b) for b in mbs])
    clean_loss = sum(f_loss(model, w, b) for b in mbs) / n + penalty(model).detach()
    data = clean if method == "base" else f_grad(model, add(w, sam_eps(clean, RHO)), mbs[-1])
    descent = add(data, f_penalty_grad(w))

    result = TrainStep(model, opt, mse, regularizer=penalty, regularizer_at="clean")(mbs)

    torch.testing.assert_close(result.loss, clean_loss, **TIGHT)
    torch.testing.assert_close(rec.grads[0], list(descent.values()), **TIGHT)


@pytest.mark.parametrize("method", ["base", "sam"])
def test_descent_hook_sees_the_descent_gradient_at_w_and_its_edit_is_the_update(method):
    """The hook runs once per step, weights at w, with the method's descent gradient in .grad; what
    it leaves there is what the base optimizer steps with (here: half of fc1's gradient, fc2's zeroed)."""
    model, opt = build(method, momentum=0.0)
    ref_model, _ = build(method, momentum=0.0)
    rec = Recorder(opt.base)
    b = batch(40)
    w = named(model)
    clean = f_grad(model, w, b)
    descent = clean if method == "base" else f_grad(model, add(w, sam_eps(clean, RHO)), b)
    seen = []

    def hook(m):
        seen.append(({k: v.detach().clone() for k, v in m.named_parameters()},
                     {k: v.grad.detach().clone() for k, v in m.named_parameters()}))
        for k, v in m.named_parameters():
            v.grad.mul_(0.5 if k.startswith("fc1") else 0.0)

    TrainStep(model, opt, mse, descent_hook=hook)([b])
    assert len(seen) == 1
    torch.testing.assert_close(seen[0][0], w, **TIGHT)
    torch.testing.assert_close(seen[0][1], descent, **TIGHT)
    expected = [g * (0.5 if k.startswith("fc1") else 0.0) for k, g in descent.items()]
    torch.testing.assert_close(rec.grads[0], expected, **TIGHT)
    for (k, p), p0 in zip(model.named_parameters(), ref_model.parameters()):
        if k.startswith("fc2"):
            assert torch.equal(p, p0)  # a zeroed gradient, no momentum, no decay: not moved


def test_regularizer_at_and_descent_hook_are_validated():
    model, opt = build("sam")
    with pytest.raises(ValueError, match="Invalid regularizer_at"):
        TrainStep(model, opt, mse, regularizer=penalty, regularizer_at="perturbed")
    with pytest.raises(ValueError, match="Invalid descent_hook"):
        TrainStep(model, opt, mse, descent_hook="project")


def test_regularizer_must_be_callable():
    model, opt = build("sam")
    with pytest.raises(ValueError, match="Invalid regularizer"):
        TrainStep(model, opt, mse, regularizer=0.1)


@pytest.mark.parametrize("accumulation", ["last", "full"])
@pytest.mark.parametrize("method", ["sam", "gasam_k1"])
def test_accumulation_against_hand_computation(method, accumulation):
    """Distinct micro-batches: ε from the mean clean gradient of the window; the descent gradient is
    the gradient at w+ε on the last micro-batch ("last") or the mean over all of them ("full");
    GA-SAM K=1 averages it with the clean gradient of the window."""
    model, opt = build(method, momentum=0.0)
    rec = Recorder(opt.base)
    mbs = [batch(10 + i, n=4 + i) for i in range(3)]  # distinct contents and sizes
    w = named(model)
    clean = mean_dicts([f_grad(model, w, b) for b in mbs])
    clean_loss = sum(f_loss(model, w, b) for b in mbs) / len(mbs)
    eps = sam_eps(clean, RHO) if method == "sam" else gasam_k1_eps(clean, RHO)
    at = add(w, eps)
    used = mbs[-1:] if accumulation == "last" else mbs
    perturbed = mean_dicts([f_grad(model, at, b) for b in used])
    descent = perturbed if method == "sam" else mean_dicts([clean, perturbed])

    result = TrainStep(model, opt, mse, accumulation=accumulation)(mbs)

    assert isinstance(result, StepResult) and result.skipped is None and result.grad_norm is None
    torch.testing.assert_close(result.loss, clean_loss, **TIGHT)
    assert_same(rec.weights[0], w.values())  # the base step sees the pre-perturbation weights
    torch.testing.assert_close(rec.grads[0], list(descent.values()), **TIGHT)
    # The update is SGD applied to the saved weights with the descent gradient, bit for bit.
    expected = [wi.add(gi, alpha=-LR) for wi, gi in zip(w.values(), rec.grads[0])]
    assert_same(clone_params(model), expected)
    torch.testing.assert_close(clone_params(model), [w[k] - LR * descent[k] for k in w], **TIGHT)


def test_looksam_reuse_step_with_accumulation_against_hand_computation():
    """LookSAM k=2: step 0 (SAM, "last") stores g_v = g_s − (⟨g, g_s⟩/‖g‖²)·g from the window's clean
    gradient g and the last micro-batch's perturbed gradient g_s; step 1 descends along
    g + α·(‖g‖/‖g_v‖)·g_v with g the window's clean gradient."""
    alpha = 0.5
    model, opt = build("looksam", momentum=0.0)
    rec = Recorder(opt.base)
    step = TrainStep(model, opt, mse)
    mbs0, mbs1 = [batch(20), batch(21)], [batch(22), batch(23)]
    w0 = named(model)
    g = mean_dicts([f_grad(model, w0, b) for b in mbs0])
    gs = f_grad(model, add(w0, sam_eps(g, RHO)), mbs0[-1])
    dot = sum((g[k] * gs[k]).sum() for k in g)
    gv = {k: gs[k] - dot / gnorm(g) ** 2 * g[k] for k in g}
    step(mbs0)
    torch.testing.assert_close(rec.grads[0], list(gs.values()), **TIGHT)
    w1 = named(model)
    g1 = mean_dicts([f_grad(model, w1, b) for b in mbs1])
    expected = {k: g1[k] + alpha * gnorm(g1) / gnorm(gv) * gv[k] for k in g1}
    step(mbs1)
    torch.testing.assert_close(rec.grads[1], list(expected.values()), **TIGHT)
    assert_same(rec.weights[1], w1.values())


# --------------------------------------------------------------------------------------------
# Exact restore


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["sam", "sam_inf", "gasam_k2", "looksam", "random_search"])
def test_base_step_sees_the_pre_perturbation_weights_bit_for_bit(method, dtype):
    model, opt = build(method, dtype=dtype)
    rec = Recorder(opt.base)
    step = TrainStep(model, opt, mse)
    for t in range(3):
        before = clone_params(model)
        state_before = copy.deepcopy(opt.base.state_dict())
        step([batch(t, dtype=dtype)])
        assert_same(rec.weights[-1], before)
        # Replay the base update on a copy of the saved weights with the recorded gradient.
        ref_params = [nn.Parameter(w.clone()) for w in before]
        ref = torch.optim.SGD(ref_params, lr=LR, momentum=0.9)
        ref.load_state_dict(state_before)
        for p, gr in zip(ref_params, rec.grads[-1]):
            p.grad = gr.clone()
        ref.step()
        assert_same(clone_params(model), [p.detach() for p in ref_params])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["sam", "gasam_k2", "random_search"])
def test_zero_learning_rate_leaves_weights_bit_identical(method, dtype):
    """No add-then-subtract drift: with lr = 0 the weights never move, step after step."""
    model, opt = build(method, dtype=dtype, lr=0.0, momentum=0.0)
    before = clone_params(model)
    step = TrainStep(model, opt, mse, accumulation="full")
    for t in range(5):
        step([batch(t, dtype=dtype), batch(t + 50, dtype=dtype)])
    assert_same(clone_params(model), before)


# --------------------------------------------------------------------------------------------
# Exceptions


class Boom(RuntimeError):
    pass


def failing_loss(fail_at: int):
    """mse that raises (after its forward, so BatchNorm has moved) on call number ``fail_at``."""
    calls = [0]

    def loss_fn(model, b):
        loss = mse(model, b)
        i = calls[0]
        calls[0] += 1
        if i == fail_at:
            raise Boom(f"call {i}")
        return loss

    loss_fn.calls = calls
    return loss_fn


@pytest.mark.parametrize("method,n,fail_at", [
    ("sam", 1, 1),             # the perturbed pass
    ("sam", 1, 0),             # the clean pass
    ("sam", 2, 3),             # the second perturbed micro-batch ("full")
    ("gasam_k2", 1, 2),        # the second ascent point
    ("looksam_k1", 1, 1),      # a SAM step of LookSAM (its g_v is not stored)
    ("random_search", 1, 2),   # a forward-only probe
    ("random_search", 1, 4),   # the perturbed pass after the probes
])
@pytest.mark.parametrize("bn", ["clean", "all"])
def test_exception_in_a_pass_leaves_everything_untouched(method, n, fail_at, bn):
    model, opt = build(method, bn=True)
    twin_model, twin_opt = build(method, bn=True)
    kw = dict(accumulation="full", bn=bn)
    warm = [batch(0, n=5)] * n
    TrainStep(model, opt, mse, **kw)(warm)
    TrainStep(twin_model, twin_opt, mse, **kw)(warm)  # the twin never sees the failing step

    params, bufs = clone_params(model), buffers(model)
    state, count = copy.deepcopy(opt.state_dict()), opt.step_count
    loss_fn = failing_loss(fail_at)
    mbs = [batch(1 + i, n=5) for i in range(n)]
    with pytest.raises(Boom):
        TrainStep(model, opt, loss_fn, **kw)(mbs)
    assert loss_fn.calls[0] == fail_at + 1
    assert_same(clone_params(model), params)
    assert_same(buffers(model), bufs)
    assert_state_equal(opt.state_dict(), state)
    assert opt.step_count == count
    assert all(p.requires_grad for p in model.parameters()) and model.training

    # The next step works, and is the one the twin takes.
    step, twin = TrainStep(model, opt, mse, **kw), TrainStep(twin_model, twin_opt, mse, **kw)
    for t in (2, 3):
        r1, r2 = step([batch(t + 10 * i, n=5) for i in range(n)]), twin([batch(t + 10 * i, n=5) for i in range(n)])
        assert torch.equal(r1.loss, r2.loss)
    assert_same(clone_params(model), clone_params(twin_model))
    assert_same(buffers(model), buffers(twin_model))
    assert_state_equal(opt.state_dict(), twin_opt.state_dict())


# --------------------------------------------------------------------------------------------
# fp16 GradScaler and autocast


_InfGrad = InfGrad


class Injector:
    """mse whose calls listed in ``at`` (counted from the last ``arm``) get an inf gradient entry
    in the first parameter; the loss value itself is unchanged."""

    def __init__(self):
        self.at, self.calls, self.dtypes = set(), 0, []

    def arm(self, *at):
        self.at, self.calls = set(at), 0

    def __call__(self, model, b):
        x, y = b
        out = model(x)
        self.dtypes.append(out.dtype)
        loss = F.mse_loss(out.float() if out.dtype != y.dtype else out, y)
        if self.calls in self.at:
            p = next(model.parameters())
            loss = loss + 0.0 * _InfGrad.apply(p).sum()
        self.calls += 1
        return loss


def test_record_unscaled_works_with_this_torch_gradscaler():
    """``record_unscaled`` writes GradScaler's private per-optimizer state: ``step`` must take the
    gradients as already unscaled (no second unscale) and ``update`` must read ``found_inf``."""
    for found in (0.0, 1.0):
        model, opt = build("base", momentum=0.0, dtype=torch.float32)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        scaler.scale(mse(model, batch(0, dtype=torch.float32))).backward()
        params = [p for p in model.parameters()]
        for p in params:
            p.grad.mul_(2.0**-10)  # unscaled by hand
        grads, before = [p.grad.clone() for p in params], clone_params(model)
        record_unscaled(scaler, opt, torch.full((1,), found))
        scaler.step(opt)
        scaler.update()
        assert_same([p.grad for p in params], grads)  # not unscaled twice
        if found:
            assert_same(clone_params(model), before)
            assert scaler.get_scale() == 2.0**9
        else:
            assert_same(clone_params(model), [w.add(g, alpha=-LR) for w, g in zip(before, grads)])
            assert scaler.get_scale() == 2.0**10


@pytest.mark.parametrize("method", ["base", "sam", "gasam_k2", "looksam", "random_search"])
def test_scaler_step_matches_the_unscaled_step(method):
    """Scaling by a power of two and unscaling is exact in float64: same steps as without AMP."""
    m1, o1 = build(method)
    m2, o2 = build(method)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    plain = TrainStep(m1, o1, mse, accumulation="full", max_grad_norm=1.0)
    scaled = TrainStep(m2, o2, mse, accumulation="full", scaler=scaler, max_grad_norm=1.0)
    for t in range(3):
        mbs = [batch(t), batch(t + 30)]
        r1, r2 = plain(mbs), scaled(mbs)
        assert r2.skipped is False and r1.skipped is None
        torch.testing.assert_close(r2.loss, r1.loss, **TIGHT)
        torch.testing.assert_close(r2.grad_norm, r1.grad_norm, **TIGHT)
    torch.testing.assert_close(clone_params(m2), clone_params(m1), **TIGHT)
    assert o2.step_count == 3 and scaler.get_scale() == 2.0**12


def test_fp16_autocast_with_scaler_matches_fp16_autocast_without():
    fp32 = dict(dtype=torch.float32)
    m1, o1 = build("sam", **fp32)
    m2, o2 = build("sam", **fp32)
    inj = Injector()
    plain = TrainStep(m1, o1, inj, autocast_dtype=torch.float16)
    scaled = TrainStep(m2, o2, inj, autocast_dtype=torch.float16, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    for t in range(3):
        b = batch(t, dtype=torch.float32)
        r1, r2 = plain([b]), scaled([b])
        assert r2.skipped is False
        torch.testing.assert_close(r2.loss, r1.loss, rtol=1e-6, atol=1e-6)
    assert set(inj.dtypes) == {torch.float16}  # autocast was on
    torch.testing.assert_close(clone_params(m2), clone_params(m1), rtol=1e-5, atol=1e-6)
    assert all(p.dtype == torch.float32 for p in m2.parameters())


def test_real_fp16_overflow_at_the_default_scale_skips_until_the_scale_fits():
    """No injection: at GradScaler's default scale (2^16) the fp16 backward overflows; those steps
    are skipped with the weights untouched and the scale halves until it fits."""
    model, opt = build("sam", dtype=torch.float32, momentum=0.0)
    scaler = torch.amp.GradScaler("cpu")
    step = TrainStep(model, opt, mse, autocast_dtype=torch.float16, scaler=scaler)
    b = batch(0, dtype=torch.float32)
    skipped = 0
    while True:
        params, scale = clone_params(model), scaler.get_scale()
        result = step([b])
        if not result.skipped:
            break
        skipped += 1
        assert_same(clone_params(model), params)
        assert scaler.get_scale() == scale / 2 and opt.step_count == 0
        assert skipped < 16
    assert skipped >= 1 and opt.step_count == 1
    assert not torch.equal(clone_params(model)[0], params[0])


@pytest.mark.parametrize("autocast", [None, torch.float16])
@pytest.mark.parametrize("method,where", [
    ("sam", "clean"), ("sam", "perturbed"), ("sam_inf", "clean"), ("gasam_k1", "clean"),
    ("gasam_k1", "perturbed"), ("gasam_k2", "perturbed"), ("looksam_k1", "clean"), ("looksam_k1", "perturbed"),
    ("looksam", "clean"),  # step 1 of LookSAM k=2 is a reuse step: the clean pass only
    ("random_search", "perturbed"),
    *[(m, where) for m in NEW_METHODS for where in ("clean", "perturbed")], ("gam", "last"), ("cflat", "last"),
])
def test_inf_gradient_skips_the_whole_step(method, where, autocast):
    model, opt = build(method, dtype=torch.float32, bn=True)
    inj = Injector()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    step = TrainStep(model, opt, inj, scaler=scaler, autocast_dtype=autocast, max_grad_norm=5.0)
    assert step([batch(0, dtype=torch.float32)]).skipped is False  # momentum buffer, g_v exist now

    params, state, count = clone_params(model), copy.deepcopy(opt.state_dict()), opt.step_count
    passes = {"clean": 0, "perturbed": {"random_search": 4}.get(method, 1), "last": 3}
    inj.arm(passes[where])
    result = step([batch(1, dtype=torch.float32)])
    assert inj.calls > passes[where]  # the injection happened
    assert result.skipped is True
    assert torch.isfinite(result.loss)
    assert_same(clone_params(model), params)
    assert_state_equal(opt.state_dict(), state)  # SGD momentum, LookSAM's g_v, the step counter
    assert opt.step_count == count
    assert scaler.get_scale() == 2.0**7

    inj.arm()
    result = step([batch(2, dtype=torch.float32)])
    assert result.skipped is False and opt.step_count == count + 1
    assert not all(torch.equal(a, b) for a, b in zip(clone_params(model), params))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_inf_on_one_micro_batch_of_the_window_skips():
    model, opt = build("sam", dtype=torch.float32)
    inj = Injector()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    params = clone_params(model)
    inj.arm(1)  # the second clean micro-batch of three
    result = TrainStep(model, opt, inj, scaler=scaler)([batch(i, dtype=torch.float32) for i in range(3)])
    assert result.skipped is True and opt.step_count == 0 and opt.state_dict()["state"] == {}
    assert_same(clone_params(model), params)


@pytest.mark.parametrize("method,inject", [
    ("base", None), ("sam", None), ("gasam_k2", None), ("looksam", None), ("random_search", None),
    ("sam", 0), ("sam", 1), ("gasam_k2", 2), ("looksam_k1", 1),
])
def test_passes_leave_the_scaled_gradient_a_callers_gradscaler_expects(method, inject):
    """``passes()`` under fp16 hands a framework (HF Trainer, Lightning, Accelerate) the gradient one
    ``scaler.scale(loss).backward()`` would: its own ``unscale_``, clipping, ``step`` and ``update``
    then take exactly the engine's step, and an overflow in any pass (injected in the clean, the
    perturbed or GA-SAM's second pass) makes ``scaler.step`` skip it with everything untouched."""
    m1, o1 = build(method, dtype=torch.float32, bn=True)
    m2, o2 = build(method, dtype=torch.float32, bn=True)
    s1, s2 = (torch.amp.GradScaler("cpu", init_scale=2.0**8) for _ in range(2))
    inj = Injector()
    engine = TrainStep(m1, o1, inj, scaler=s1, autocast_dtype=torch.float16, max_grad_norm=5.0)
    framework = TrainStep(m2, o2, inj, scaler=s2, autocast_dtype=torch.float16)
    for t in range(3):
        mbs = [batch(t, dtype=torch.float32), batch(t + 30, dtype=torch.float32)]
        armed = inject is not None and t == 1
        inj.arm(*([inject] if armed else []))
        r1 = engine(mbs)
        assert r1.skipped is armed
        inj.arm(*([inject] if armed else []))
        params, state, count = clone_params(m2), copy.deepcopy(o2.state_dict()), o2.step_count
        loss = framework.passes(mbs)
        scale = s2.get_scale()
        s2.unscale_(o2)
        norm = nn.utils.clip_grad_norm_(o2.all_params_with_grad(), 5.0)
        s2.step(o2)
        s2.update()
        assert torch.equal(loss, r1.loss)
        if armed:
            assert not torch.isfinite(norm) and s2.get_scale() == scale / 2
            assert_same(clone_params(m2), params)
            assert_state_equal(o2.state_dict(), state)
            assert o2.step_count == count
        else:
            torch.testing.assert_close(norm, r1.grad_norm, rtol=0, atol=0)
        assert_same(clone_params(m2), clone_params(m1))
        assert_same(buffers(m2), buffers(m1))
    assert o2.step_count == o1.step_count == (2 if inject is not None else 3)
    assert s1.get_scale() == s2.get_scale()


def test_disabled_scaler_is_a_no_op():
    m1, o1 = build("sam")
    m2, o2 = build("sam")
    r1 = TrainStep(m1, o1, mse)([batch(0)])
    r2 = TrainStep(m2, o2, mse, scaler=torch.amp.GradScaler("cpu", enabled=False))([batch(0)])
    assert r2.skipped is None
    assert torch.equal(r1.loss, r2.loss)
    assert_same(clone_params(m2), clone_params(m1))


@pytest.mark.parametrize("method", ["sam", "gasam_k2"])
def test_bf16_autocast_runs_and_restores_exactly(method):
    model, opt = build(method, dtype=torch.float32)
    ref_model, ref_opt = build(method, dtype=torch.float32)
    rec = Recorder(opt.base)
    inj = Injector()
    step = TrainStep(model, opt, inj, autocast_dtype=torch.bfloat16, accumulation="full")
    ref = TrainStep(ref_model, ref_opt, mse, accumulation="full")
    for t in range(3):
        before = clone_params(model)
        mbs = [batch(t, dtype=torch.float32), batch(t + 40, dtype=torch.float32)]
        result = step(mbs)
        ref(mbs)
        assert result.skipped is None and torch.isfinite(result.loss) and result.loss.dtype == torch.float32
        assert_same(rec.weights[-1], before)
        assert all(g.dtype == torch.float32 for g in rec.grads[-1])
    assert set(inj.dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # bf16 matmuls: close to the float32 run, not equal.
    torch.testing.assert_close(clone_params(model), clone_params(ref_model), rtol=0, atol=5e-2)


# --------------------------------------------------------------------------------------------
# BatchNorm


class Tape:
    """mse that records, per call, the weights it ran at and its batch."""

    def __init__(self):
        self.calls: list[tuple[list[torch.Tensor], tuple]] = []
        self.steps: list[int] = []

    def mark(self):
        self.steps.append(len(self.calls))

    def __call__(self, model, b):
        self.calls.append((clone_params(model), b))
        return mse(model, b)


def replay(model: nn.Module, tape: Tape, which: str, n: int) -> list[torch.Tensor]:
    """Running statistics after training-mode forwards of the recorded calls (all of them, or the
    first ``n`` of each step: the clean micro-batches), at the weights each call ran at."""
    ends = tape.steps[1:] + [len(tape.calls)]
    with torch.no_grad():
        for start, end in zip(tape.steps, ends):
            for i in range(start, end if which == "all" else start + n):
                weights, (x, _) = tape.calls[i]
                for p, w in zip(model.parameters(), weights):
                    p.copy_(w)
                model(x)
    return buffers(model)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("accumulation,n", [("last", 1), ("last", 3), ("full", 2)])
@pytest.mark.parametrize("bn", ["clean", "all", "frozen"])
@pytest.mark.parametrize("method", ["sam", "gasam_k2", "random_search", "vasso", "wsam", "gam"])
def test_batchnorm_statistics(method, bn, accumulation, n, momentum):
    model, opt = build(method, bn=True, bn_momentum=momentum)
    reference = copy.deepcopy(model)
    before = buffers(model)
    tape = Tape()
    step = TrainStep(model, opt, tape, accumulation=accumulation, bn=bn)
    for t in range(2):
        tape.mark()
        step([batch(t + 7 * i, n=5) for i in range(n)])
    after = buffers(model)
    if bn == "frozen":
        assert_same(after, before)
        return
    assert_same(after, replay(reference, tape, bn, n))
    tracked = model.norm.num_batches_tracked.item()
    assert tracked == (2 * n if bn == "clean" else len(tape.calls))


def test_batchnorm_clean_statistics_are_one_forward_per_micro_batch():
    """bn="clean" with one micro-batch: the statistics are those of ONE training-mode forward of the
    clean batch at w, for momentum 0.1 and for the cumulative average (momentum=None)."""
    for momentum in (0.1, None):
        model, opt = build("sam", bn=True, bn_momentum=momentum)
        reference = copy.deepcopy(model)
        b = batch(3, n=7)
        TrainStep(model, opt, mse)([b])
        with torch.no_grad():
            reference(b[0])
        assert_same(buffers(model), buffers(reference))
        assert model.norm.num_batches_tracked.item() == 1


def test_batchnorm_policy_follows_buffers_replaced_after_construction():
    """``model.to(dtype)`` keeps the Parameter objects (the optimizer still works) but replaces the
    buffer tensors: the policy must act on the model's current buffers."""
    model = Net(bn=True, dtype=torch.float32)
    opt = fm.SAM(torch.optim.SGD(model.parameters(), lr=LR), rho=RHO)
    frozen = TrainStep(model, opt, mse, bn="frozen")
    model.to(torch.float64)
    before = buffers(model)
    frozen([batch(0)])
    assert_same(buffers(model), before)
    reference = copy.deepcopy(model)
    tape = Tape()
    tape.mark()
    TrainStep(model, opt, tape, bn="clean")([batch(1)])
    assert_same(buffers(model), replay(reference, tape, "clean", 1))


# --------------------------------------------------------------------------------------------
# Clipping


@pytest.mark.parametrize("method", ["sam", "gasam_k1", "looksam"])
def test_clipping_applies_to_the_final_descent_gradient(method):
    m1, o1 = build(method, momentum=0.0)
    m2, o2 = build(method, momentum=0.0)
    r1, r2 = Recorder(o1.base), Recorder(o2.base)
    free = TrainStep(m1, o1, mse, accumulation="full")
    for t in range(3):
        mbs = [batch(t), batch(t + 20)]
        free(mbs)
        descent = r1.grads[-1]
        norm = torch.sqrt(sum((g * g).sum() for g in descent))
        clip = 0.5 * norm.item()
        torch.testing.assert_close(clone_params(m2), [w for w in r1.weights[-1]], **EXACT)
        result = TrainStep(m2, o2, mse, accumulation="full", max_grad_norm=clip)(mbs)
        torch.testing.assert_close(result.grad_norm, norm, **TIGHT)  # the norm before clipping
        coef = clip / (norm + 1e-6)
        torch.testing.assert_close(r2.grads[-1], [g * coef for g in descent], **TIGHT)
        torch.testing.assert_close(clone_params(m2), [w - LR * coef * g for w, g in zip(r1.weights[-1], descent)],
                                   **TIGHT)
        # keep both runs on the same trajectory
        with torch.no_grad():
            for p, q in zip(m1.parameters(), m2.parameters()):
                p.copy_(q)


def test_clipping_against_hand_computed_sam_gradient():
    model, opt = build("sam", momentum=0.0)
    b = batch(5)
    w = named(model)
    d = f_grad(model, add(w, sam_eps(f_grad(model, w, b), RHO)), b)
    norm = gnorm(d)
    result = TrainStep(model, opt, mse, max_grad_norm=0.25 * norm.item())([b])
    torch.testing.assert_close(result.grad_norm, norm, **TIGHT)
    coef = 0.25 * norm / (norm + 1e-6)
    torch.testing.assert_close(clone_params(model), [w[k] - LR * coef * d[k] for k in w], **TIGHT)


def test_clipping_above_the_norm_changes_nothing():
    m1, o1 = build("sam")
    m2, o2 = build("sam")
    TrainStep(m1, o1, mse)([batch(0)])
    result = TrainStep(m2, o2, mse, max_grad_norm=1e6)([batch(0)])
    assert result.grad_norm is not None and result.grad_norm < 1e6
    assert_same(clone_params(m2), clone_params(m1))


# --------------------------------------------------------------------------------------------
# Validation and plain optimizers


@pytest.mark.parametrize("kwargs,name", [
    (dict(accumulation="mean"), "accumulation"),
    (dict(accumulation=None), "accumulation"),
    (dict(bn="eval"), "bn"),
    (dict(bn=None), "bn"),
    (dict(autocast_dtype=torch.float32), "autocast_dtype"),
    (dict(autocast_dtype="bf16"), "autocast_dtype"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm"),
    (dict(max_grad_norm="1.0"), "max_grad_norm"),
    (dict(max_grad_norm=True), "max_grad_norm"),
    (dict(scaler="fp16"), "scaler"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    model = Net()
    base = torch.optim.SGD(model.parameters(), lr=LR)
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in base.param_groups])
    params = clone_params(model)
    with pytest.raises(ValueError, match=name):
        TrainStep(model, base, mse, **kwargs)
    # Nothing mutated: the plain optimizer was not wrapped (no rho/initial_lr added).
    assert [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups] == groups
    assert_same(clone_params(model), params)


@pytest.mark.parametrize("micro_batches", [[], (), iter([]), batch(0)[0], {"x": batch(0)[0]}])
def test_bad_micro_batches_raise_and_mutate_nothing(micro_batches):
    model, opt = build("sam", bn=True)
    step = TrainStep(model, opt, mse)
    params, bufs, state = clone_params(model), buffers(model), copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="micro_batches"):
        step(micro_batches)
    assert_same(clone_params(model), params)
    assert_same(buffers(model), bufs)
    assert_state_equal(opt.state_dict(), state)
    assert all(p.grad is None for p in model.parameters())


def test_plain_torch_optimizer_is_a_manual_sgd_step():
    model = Net()
    ref = copy.deepcopy(model)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), mse)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9)
    for t in range(3):
        mbs = [batch(t), batch(t + 60, n=3), batch(t + 70)]
        result = step(mbs)
        ref_opt.zero_grad()
        total = 0.0
        for b in mbs:
            loss = mse(ref, b) * (1.0 / len(mbs))
            loss.backward()
            total = total + loss.detach()
        ref_opt.step()
        assert torch.equal(result.loss, total)
        assert_same(clone_params(model), clone_params(ref))
    assert isinstance(step.optimizer, fm.Base) and step.optimizer.step_count == 3


def test_functional_train_step_is_the_class():
    m1, o1 = build("gasam_k1")
    m2, o2 = build("gasam_k1")
    step = TrainStep(m1, o1, mse, accumulation="full")
    for t in range(2):
        mbs = [batch(t), batch(t + 5)]
        r1 = step(mbs)
        r2 = fm.train_step(m2, o2, mse, mbs, accumulation="full")
        assert torch.equal(r1.loss, r2.loss)
    assert_same(clone_params(m2), clone_params(m1))
