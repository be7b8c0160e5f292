"""Random weight perturbation (RWP, m-RWP): closed forms on ½xᵀAx in float64, the noise scales of
seed 000, Fisher damping, and the accumulation semantics of DESIGN.md §4."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import flatminima as fm
from helpers import Quadratic

LR, SIGMA = 0.1, 0.05
TOL = dict(rtol=0, atol=1e-12)


def hand_scale(W: torch.Tensor, b: torch.Tensor, noise: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``S`` for the 2×3 matrix and the 2-vector (1-D tensors use their own norm)."""
    if noise == "uniform":
        return torch.ones_like(W), torch.ones_like(b)
    if noise == "matrix":
        return W.norm().expand_as(W), b.norm().expand_as(b)
    if noise == "element":
        return W.abs(), b.abs()
    if noise == "filter":
        return W.norm(dim=1, keepdim=True).expand_as(W), b.norm().expand_as(b)
    return (W.norm(dim=1, keepdim=True) / math.sqrt(3)).expand_as(W), (b.norm() / math.sqrt(2)).expand_as(b)


def hand_noise(opt: fm.FlatOptimizer, model: Quadratic, noise: str, fisher=None, eta=0.0) -> torch.Tensor:
    """ε = σ·Z ⊙ S with Z regenerated from the method's documented seeding (seed, step, rank, tensor)."""
    out = []
    for i, (p, s) in enumerate(zip((model.W, model.b), hand_scale(model.W.detach(), model.b.detach(), noise))):
        z = torch.randn(p.shape, generator=torch.Generator().manual_seed(opt.rng_seed(stream=i)), dtype=p.dtype)
        e = SIGMA * z * s
        if fisher is not None:
            e = e / torch.sqrt(1 + eta * fisher[i])
        out.append(e.flatten())
    return torch.cat(out)


@pytest.mark.parametrize("noise", ["uniform", "matrix", "element", "filter", "flatlora"])
def test_rwp_closed_form(noise):
    model = Quadratic()
    opt = fm.RWP(torch.optim.SGD(model.parameters(), lr=LR), sigma=SIGMA, noise=noise, seed=7)
    A, x = model.A, model.flat().detach().clone()
    eps = hand_noise(opt, model, noise)
    calls = []

    def closure(backward=True):
        calls.append(model.flat().detach().clone())
        return model.closure()(backward)

    loss = opt.step(closure)
    assert len(calls) == 1  # one pass, at w + ε: no clean pass
    torch.testing.assert_close(calls[0], x + eps, **TOL)
    torch.testing.assert_close(loss, 0.5 * (x + eps) @ A @ (x + eps), **TOL)
    torch.testing.assert_close(model.flat().detach(), x - LR * A @ (x + eps), **TOL)


@pytest.mark.parametrize("noisy_weight", [0.5, 0.8, 0.0, 1.0])
def test_mrwp_closed_form(noisy_weight):
    model = Quadratic()
    opt = fm.MRWP(torch.optim.SGD(model.parameters(), lr=LR), sigma=SIGMA, noisy_weight=noisy_weight)
    A, x = model.A, model.flat().detach().clone()
    eps = hand_noise(opt, model, "filter")
    loss = opt.step(model.closure())
    torch.testing.assert_close(loss, 0.5 * x @ A @ x, **TOL)  # the clean loss
    expected = x - LR * (noisy_weight * A @ (x + eps) + (1 - noisy_weight) * A @ x)
    torch.testing.assert_close(model.flat().detach(), expected, **TOL)


def test_fisher_damping():
    """Step 1's noise is S/√(1 + η·F) with F = (1 − β)·g₀², g₀ the descent gradient of step 0."""
    model = Quadratic()
    opt = fm.RWP(torch.optim.SGD(model.parameters(), lr=LR), sigma=SIGMA, fisher_eta=2.0, fisher_decay=0.9)
    A, x0 = model.A, model.flat().detach().clone()
    eps0 = hand_noise(opt, model, "filter")
    opt.step(model.closure())
    g0 = A @ (x0 + eps0)
    x1 = x0 - LR * g0
    fisher = [(0.1 * g0[:6] ** 2).view(2, 3), 0.1 * g0[6:] ** 2]
    eps1 = hand_noise(opt, model, "filter", fisher, eta=2.0)
    opt.step(model.closure())
    torch.testing.assert_close(model.flat().detach(), x1 - LR * A @ (x1 + eps1), **TOL)
    torch.testing.assert_close(opt.method_state[model.W]["noise.fisher"].flatten(), 0.9 * fisher[0].flatten()
                               + 0.1 * (A @ (x1 + eps1))[:6] ** 2, **TOL)


def test_noise_is_drawn_once_per_step_and_differs_between_steps_and_seeds():
    def first_eps(seed, steps):
        model = Quadratic()
        opt = fm.RWP(torch.optim.SGD(model.parameters(), lr=0.0), sigma=SIGMA, seed=seed)
        seen = []

        def closure(backward=True):
            seen.append(model.flat().detach().clone())
            return model.closure()(backward)

        for _ in range(steps):
            opt.step(closure)
        return seen

    a, b, c = first_eps(0, 2), first_eps(0, 2), first_eps(1, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], c[0])


class LeastSquares(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))

    @staticmethod
    def loss(model, batch):
        X, y = batch
        return 0.5 * ((X @ model.w.T - y) ** 2).sum(1).mean()


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64))
            for _ in range(n)]


def grad_at(w, batch):
    w = w.clone().requires_grad_(True)
    X, y = batch
    (0.5 * ((X @ w.T - y) ** 2).sum(1).mean()).backward()
    return w.grad


@pytest.mark.parametrize("accumulation", ["last", "full"])
def test_accumulation_semantics(accumulation):
    """RWP: the noisy pass is the whole gradient, over every micro-batch. m-RWP ("last"): N clean
    passes and one noisy pass on the last micro-batch, g = λ·g_noisy + (1 − λ)·mean g_clean."""
    mbs = batches(3)
    for method, hp in (("rwp", {}), ("mrwp", {"noisy_weight": 0.7})):
        model = LeastSquares()
        opt = fm.create(method, torch.optim.SGD(model.parameters(), lr=LR), sigma=SIGMA, noise="element", **hp)
        w = model.w.detach().clone()
        z = torch.randn(w.shape, generator=torch.Generator().manual_seed(opt.rng_seed(stream=0)), dtype=w.dtype)
        eps = SIGMA * z * w.abs()
        fm.TrainStep(model, opt, LeastSquares.loss, accumulation=accumulation)(mbs)
        noisy_over = mbs if (method == "rwp" or accumulation == "full") else mbs[-1:]
        noisy = sum(grad_at(w + eps, b) for b in noisy_over) / len(noisy_over)
        clean = sum(grad_at(w, b) for b in mbs) / len(mbs)
        g = noisy if method == "rwp" else 0.7 * noisy + 0.3 * clean
        torch.testing.assert_close(model.w.detach(), w - LR * g, **TOL)


def test_explicit_form_for_rwp_has_no_clean_pass():
    a, b = Quadratic(), Quadratic()
    opt_a = fm.RWP(torch.optim.SGD(a.parameters(), lr=LR), sigma=SIGMA)
    opt_b = fm.RWP(torch.optim.SGD(b.parameters(), lr=LR), sigma=SIGMA)
    for _ in range(3):
        opt_a.step(a.closure())
        with opt_b.perturbed():
            b.closure()()
        opt_b.step()
    assert torch.equal(a.flat(), b.flat())


def noise_for(opt, w, sample, scale):
    z = torch.randn(w.shape, generator=torch.Generator().manual_seed(opt.rng_seed(stream=0, device_index=sample)),
                    dtype=w.dtype)
    return SIGMA * z * scale


def closure_for(model):
    def closure(batch):
        loss = LeastSquares.loss(model, batch)
        loss.backward()
        return loss.detach()
    return closure


def test_lpfsgd_mean_over_chunks():
    """Mean of ∇L_{B_m}(w + ε_m) over M independent draws, one chunk each (closure form and engine)."""
    chunks = batches(3)
    for form in ("closure", "engine"):
        model = LeastSquares()
        opt = fm.LPFSGD(torch.optim.SGD(model.parameters(), lr=LR), sigma=SIGMA, samples=3)
        w = model.w.detach().clone()
        S = w.norm(dim=1, keepdim=True)
        expected = w - LR * sum(grad_at(w + noise_for(opt, w, m, S), chunks[m]) for m in range(3)) / 3
        if form == "closure":
            opt.step(closure_for(model), batches=chunks)
        else:
            fm.TrainStep(model, opt, LeastSquares.loss)(chunks)
        torch.testing.assert_close(model.w.detach(), expected, **TOL)


def test_lpfsgd_without_chunks_and_sigma_schedule():
    chunk = batches(1)[0]
    model = LeastSquares()
    opt = fm.LPFSGD(torch.optim.SGD(model.parameters(), lr=LR), sigma=SIGMA, samples=2, alpha=2.0, total_steps=10)
    w = model.w.detach().clone()
    S = w.norm(dim=1, keepdim=True)
    expected = w - LR * sum(grad_at(w + noise_for(opt, w, m, S), chunk) for m in range(2)) / 2
    opt.step(lambda: closure_for(model)(chunk))
    torch.testing.assert_close(model.w.detach(), expected, **TOL)
    opt._step = 5  # σ_t = σ·(α/2·(1 − cos(πt/T)) + 1)
    assert opt.strengths() == [pytest.approx(SIGMA * (2.0 / 2 * (1 - math.cos(math.pi * 5 / 10)) + 1))]


def test_mrwp_on_two_batches():
    """seed 004, Table A1: λ·∇L_{B1}(w + ε) + (1 − λ)·∇L_{B2}(w)."""
    b1, b2 = batches(2)
    for form in ("closure", "engine"):
        model = LeastSquares()
        opt = fm.MRWP(torch.optim.SGD(model.parameters(), lr=LR), sigma=SIGMA, noisy_weight=0.6,
                      different_batches=True)
        w = model.w.detach().clone()
        eps = noise_for(opt, w, 0, w.norm(dim=1, keepdim=True))
        expected = w - LR * (0.6 * grad_at(w + eps, b1) + 0.4 * grad_at(w, b2))
        if form == "closure":
            with torch.no_grad():
                clean = LeastSquares.loss(model, b2)
            loss = opt.step(closure_for(model), batches=[b1, b2])
            torch.testing.assert_close(loss, clean, **TOL)  # the clean loss, on B2
        else:
            fm.TrainStep(model, opt, LeastSquares.loss)([b1, b2])
        torch.testing.assert_close(model.w.detach(), expected, **TOL)


def test_sam_on_two_batches():
    """seed 004, Table A1's SAM variant: ε = ρ·g_{B1}/‖g_{B1}‖, descend along ∇L_{B2}(w + ε)."""
    b1, b2 = batches(2)
    rho = 0.1
    for form in ("closure", "engine"):
        model = LeastSquares()
        opt = fm.SAM(torch.optim.SGD(model.parameters(), lr=LR), rho=rho, different_batches=True)
        w = model.w.detach().clone()
        g1 = grad_at(w, b1)
        expected = w - LR * grad_at(w + rho * g1 / g1.norm(), b2)
        if form == "closure":
            opt.step(closure_for(model), batches=[b1, b2])
        else:
            fm.TrainStep(model, opt, LeastSquares.loss)([b1, b2])
        torch.testing.assert_close(model.w.detach(), expected, **TOL)


def test_batches_are_validated_before_anything_moves():
    model = LeastSquares()
    w = model.w.detach().clone()
    sam = fm.SAM(torch.optim.SGD(model.parameters(), lr=LR))
    with pytest.raises(ValueError, match="batches"):
        sam.step(closure_for(model), batches=batches(2))
    lpf = fm.LPFSGD(torch.optim.SGD(model.parameters(), lr=LR), samples=3)
    with pytest.raises(ValueError, match="3 batches"):
        lpf.step(closure_for(model), batches=batches(2))
    with pytest.raises(ValueError, match="multiple of 3"):
        fm.TrainStep(model, lpf, LeastSquares.loss)(batches(2))
    assert torch.equal(model.w.detach(), w) and lpf.step_count == 0


def test_explicit_form_tells_which_batch():
    chunks = batches(2)
    a, b = LeastSquares(), LeastSquares()
    opt_a = fm.LPFSGD(torch.optim.SGD(a.parameters(), lr=LR), sigma=SIGMA, samples=2)
    opt_b = fm.LPFSGD(torch.optim.SGD(b.parameters(), lr=LR), sigma=SIGMA, samples=2)
    opt_a.step(closure_for(a), batches=chunks)
    for p in opt_b.perturbations():
        LeastSquares.loss(b, chunks[p.batch[0]]).backward()
    opt_b.step()
    assert torch.equal(a.w, b.w)


def test_batchnorm_statistics_follow_the_first_pass_without_a_clean_pass():
    """RWP has no clean pass: with bn="clean" its noisy pass moves the statistics, once per step;
    of LPF-SGD's chunks only the first does. Replayed by hand on a twin at w + ε₀."""
    for name, hp, n in (("rwp", {}, 1), ("lpfsgd", {"samples": 2}, 2)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()
        opt = fm.create(name, torch.optim.SGD(model.parameters(), lr=0.1), sigma=SIGMA, **hp)
        x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        chunks = [(x[i::n], y[i::n]) for i in range(n)]
        twin = copy.deepcopy(model)
        params, gidx = opt.scoped_params(with_grad=False)
        eps0 = [e.clone() for e in opt.perturbation.noise(opt, params, gidx, 0)]
        with torch.no_grad():
            for p, e in zip(twin.parameters(), eps0):
                p.add_(e)
            twin(chunks[0][0])  # training mode: one update of the running statistics
        fm.TrainStep(model, opt, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))(chunks)
        assert int(model[1].num_batches_tracked) == 1
        torch.testing.assert_close(model[1].running_mean, twin[1].running_mean, rtol=0, atol=1e-14)
        torch.testing.assert_close(model[1].running_var, twin[1].running_var, rtol=0, atol=1e-14)


@pytest.mark.parametrize("noise", ["uniform", "matrix", "element", "filter", "flatlora"])
def test_noise_statistics_match_the_scale(noise):
    """Over many draws (steps), the per-entry standard deviation of ε is σ·S."""
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    param = nn.Parameter(w.clone())
    opt = fm.RWP(torch.optim.SGD([param], lr=0.0), sigma=SIGMA, noise=noise, seed=11)
    draws = []
    for step in range(2000):
        opt._step = step
        draws.append(next(opt.perturbation.noise(opt, [param], [0])))
    std = torch.stack(draws).std(0)
    S = {"uniform": torch.ones_like(w), "matrix": w.norm().expand_as(w), "element": w.abs(),
         "filter": w.norm(dim=1, keepdim=True).expand_as(w),
         "flatlora": (w.norm(dim=1, keepdim=True) / math.sqrt(6)).expand_as(w)}[noise]
    # 2000 draws: the sample std is within a few percent of the true one
    torch.testing.assert_close(std, SIGMA * S, rtol=0.08, atol=0)


def test_fisher_damping_lowers_noise_where_fisher_is_large():
    param = nn.Parameter(torch.ones(2, 500, dtype=torch.float64))
    opt = fm.RWP(torch.optim.SGD([param], lr=0.0), sigma=SIGMA, noise="uniform", fisher_eta=1.0)
    opt.method_state[param]["noise.fisher"] = torch.cat([torch.zeros(1, 500), torch.full((1, 500), 99.0)]).double()
    eps = next(opt.perturbation.noise(opt, [param], [0]))
    small, large = eps[0].std(), eps[1].std()
    assert abs(small / SIGMA - 1) < 0.1 and abs(large / (SIGMA / 10) - 1) < 0.1  # S/√(1 + η·F)
