"""Step-by-step equality with the reference implementations users know.

A float64 two-layer network on a fixed batch (cross-entropy) takes five steps with ours and with the
reference from the same weights and the same base optimizer (SGD, lr 0.1, momentum 0.9, with and
without weight decay); the weights must agree after every step.

- pytorch_optimizer 4.1.0 (kozistr): GSAM, WSAM (coupled and decoupled), FriendlySAM.
- INFTY 0.1.2 (``infty.optim``): GSAM, GAM, C-Flat (basic and plus).
"""

from __future__ import annotations

import copy
from importlib.metadata import version

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatminima as fm

STEPS = 5
SETTINGS = [dict(lr=0.1, momentum=0.9), dict(lr=0.1, momentum=0.9, weight_decay=5e-3)]
SETTING_IDS = ["sgd-momentum", "sgd-momentum-wd"]
EXACT = dict(rtol=1e-10, atol=1e-12)
# pytorch_optimizer's get_global_gradient_norm (optimizer/utils/gradient.py) casts the per-tensor norms
# to float32 before summing (`.float()`), even for float64 gradients, so its ε and GSAM's projection carry
# float32 rounding (~6e-8 relative in the norm). Over five steps the weights then differ by up to ~4e-9
# (measured: 3.7e-9 for GSAM, on a weight of size ~7e-5): 1e-8 absolute is the tightest round bound that
# holds. The float64 variants replace that one function with a float64 one and compare at 1e-10.
FLOAT32_NORM = dict(rtol=1e-7, atol=1e-8)


def _model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


X, Y = _batch()


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _ours(model: nn.Module, method, settings: dict, **kw) -> list[list[torch.Tensor]]:
    """Our optimizer on SGD(settings); the weights after each of the STEPS steps."""
    opt = method(torch.optim.SGD(model.parameters(), **settings), **kw)

    def closure():
        loss = F.cross_entropy(model(X), Y)
        loss.backward()
        return loss

    out = []
    for _ in range(STEPS):
        opt.step(closure)
        out.append(_weights(model))
    return out


def _assert_trajectories(ours, ref, tol) -> None:
    assert len(ours) == len(ref) == STEPS
    for step, (a, b) in enumerate(zip(ours, ref), 1):
        for i, (x, y) in enumerate(zip(a, b)):
            torch.testing.assert_close(x, y, **tol, msg=lambda m: f"step {step}, tensor {i}: {m}")


def _max_diff(ours, ref) -> float:
    return max((x - y).abs().max().item() for a, b in zip(ours, ref) for x, y in zip(a, b))


# ---------------------------------------------------------------- pytorch_optimizer (kozistr) 4.1.0


@pytest.fixture(params=[False, True], ids=["float32-norm", "float64-norm"])
def kozistr(request, monkeypatch):
    """pytorch_optimizer's sam module and the tolerance to hold it to: as shipped (float32 global norms)
    or with the global norm computed in the gradients' dtype."""
    pytest.importorskip("pytorch_optimizer")
    from pytorch_optimizer.optimizer import sam

    assert version("pytorch_optimizer") == "4.1.0"
    if not request.param:
        return sam, FLOAT32_NORM

    def norm_sq(param_groups, device=None, *, weight_adaptive=False):
        grads = [p.grad * p.abs() if weight_adaptive and group.get("adaptive", False) else p.grad
                 for group in param_groups or [] for p in group["params"] if p.grad is not None]
        return torch.stack([g.norm() for g in grads]).square().sum().reshape(1)

    monkeypatch.setattr(sam, "get_global_gradient_norm", norm_sq)
    return sam, EXACT


class _ConstantRho:
    """The rho_scheduler pytorch_optimizer's GSAM asks for, here a constant radius."""

    def __init__(self, rho: float):
        self.rho = rho

    def step(self) -> float:
        return self.rho


def _kozistr_closure(model, ref):
    def closure():
        ref.zero_grad()
        loss = F.cross_entropy(model(X), Y)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("settings", SETTINGS, ids=SETTING_IDS)
def test_gsam_matches_pytorch_optimizer(kozistr, settings):
    sam, tol = kozistr
    rho, alpha = 0.05, 0.4
    model = _model()
    theirs = copy.deepcopy(model)
    ref = sam.GSAM(theirs.parameters(), torch.optim.SGD(theirs.parameters(), **settings), model=theirs,
                   rho_scheduler=_ConstantRho(rho), alpha=alpha)
    ref.set_closure(F.cross_entropy, X, Y)
    expected = []
    for _ in range(STEPS):
        ref.step()
        expected.append(_weights(theirs))
    _assert_trajectories(_ours(model, fm.GSAM, settings, rho=rho, alpha=alpha), expected, tol)


@pytest.mark.parametrize("decouple", [True, False], ids=["decoupled", "coupled"])
@pytest.mark.parametrize("settings", SETTINGS, ids=SETTING_IDS)
def test_wsam_matches_pytorch_optimizer(kozistr, settings, decouple):
    sam, tol = kozistr
    rho, gamma = 0.05, 0.9
    model = _model()
    theirs = copy.deepcopy(model)
    # pytorch_optimizer's WSAM builds its base optimizer itself, from the class and its keyword arguments.
    ref = sam.WSAM(theirs, theirs.parameters(), torch.optim.SGD, rho=rho, gamma=gamma, decouple=decouple,
                   **settings)
    closure = _kozistr_closure(theirs, ref)
    expected = []
    for _ in range(STEPS):
        ref.step(closure)
        expected.append(_weights(theirs))
    ours = _ours(model, fm.WSAM, settings, rho=rho, gamma=gamma, decouple=decouple)
    _assert_trajectories(ours, expected, tol)


@pytest.mark.parametrize("sigma, lmbda", [(1.0, 0.9), (0.5, 0.6)])
@pytest.mark.parametrize("settings", SETTINGS, ids=SETTING_IDS)
def test_friendlysam_matches_pytorch_optimizer(kozistr, settings, sigma, lmbda):
    sam, tol = kozistr
    rho = 0.05
    model = _model()
    theirs = copy.deepcopy(model)
    ref = sam.FriendlySAM(theirs.parameters(), torch.optim.SGD, rho=rho, sigma=sigma, lmbda=lmbda, **settings)
    closure = _kozistr_closure(theirs, ref)
    expected = []
    for _ in range(STEPS):
        closure()  # its step() expects the clean gradient already computed
        ref.step(closure)
        expected.append(_weights(theirs))
    ours = _ours(model, fm.FriendlySAM, settings, rho=rho, sigma=sigma, lmbda=lmbda)
    _assert_trajectories(ours, expected, tol)


# ---------------------------------------------------------------------------------------- INFTY 0.1.2


@pytest.fixture
def infty_optim():
    pytest.importorskip("infty")

    import infty.optim

    assert version("infty") == "0.1.2"
    return infty.optim


def _infty_run(model, ref, calls: list[int] | None = None) -> list[list[torch.Tensor]]:
    """Step an INFTY optimizer STEPS times; ``calls`` receives the forward passes each step took."""
    count = [0]

    def loss_fn():
        count[0] += 1
        logits = model(X)
        return logits, [F.cross_entropy(logits, Y)]

    ref.set_closure(loss_fn)
    out = []
    for _ in range(STEPS):
        count[0] = 0
        ref.step()
        out.append(_weights(model))
        if calls is not None:
            calls.append(count[0])
    return out


def _infty(cls, model, settings, args, grad_norm_rho=None):
    ref = cls(model.parameters(), torch.optim.SGD(model.parameters(), **settings), model, args)
    if grad_norm_rho is not None:
        # INFTY's grad_norm_ascent reads self.grad_norm_rho, which nothing sets: without this its
        # gradient-norm ascent radius is 1.0 whatever norm_rho (GAM) or rho (C-Flat) says.
        ref.grad_norm_rho = grad_norm_rho
    return ref


@pytest.mark.parametrize("settings", SETTINGS, ids=SETTING_IDS)
def test_gsam_matches_infty(infty_optim, settings):
    rho, alpha = 0.05, 0.4  # INFTY's own defaults (0.1, 0.2) differ from ours: passed explicitly
    model = _model()
    theirs = copy.deepcopy(model)
    expected = _infty_run(theirs, _infty(infty_optim.GSAM, theirs, settings, dict(rho=rho, alpha=alpha)))
    _assert_trajectories(_ours(model, fm.GSAM, settings, rho=rho, alpha=alpha), expected, EXACT)


GAM_ARGS = dict(rho=0.1, norm_rho=0.02, grad_beta_1=1.0, grad_beta_2=-1.0, grad_beta_3=1.0, grad_gamma=0.3)
GAM_OTHER = dict(rho=0.08, norm_rho=0.05, grad_beta_1=0.7, grad_beta_2=-0.4, grad_beta_3=0.6, grad_gamma=0.5)


@pytest.mark.parametrize("args", [GAM_ARGS, GAM_OTHER], ids=["defaults", "other"])
@pytest.mark.parametrize("settings", SETTINGS, ids=SETTING_IDS)
def test_gam_matches_infty_with_its_radius_fixed(infty_optim, settings, args):
    model = _model()
    theirs = copy.deepcopy(model)
    ref = _infty(infty_optim.GAM, theirs, settings, args, grad_norm_rho=args["norm_rho"])
    expected = _infty_run(theirs, ref)
    _assert_trajectories(_ours(model, fm.GAM, settings, **args), expected, EXACT)


CFLAT_BASIC = dict(strategy="basic", rho=0.1, lamb=0.2)
# C-Flat+ with a threshold that this batch crosses both ways within five steps (asserted below).
CFLAT_PLUS = dict(strategy="plus", rho=0.1, lamb=0.2, A=0.6, k=1.0, t0=1.0, cof=1.0)


@pytest.mark.parametrize("args", [CFLAT_BASIC, CFLAT_PLUS], ids=["basic", "plus"])
@pytest.mark.parametrize("settings", SETTINGS, ids=SETTING_IDS)
def test_cflat_matches_infty_with_its_radius_fixed(infty_optim, settings, args):
    model = _model()
    theirs = copy.deepcopy(model)
    ref = _infty(infty_optim.C_Flat, theirs, settings, args, grad_norm_rho=args["rho"])
    calls: list[int] = []
    expected = _infty_run(theirs, ref, calls)
    if args["strategy"] == "plus":
        assert 1 in calls and 4 in calls, calls  # both plain and perturbed steps are compared
    else:
        assert calls == [4] * STEPS
    _assert_trajectories(_ours(model, fm.CFlat, settings, **args), expected, EXACT)


@pytest.mark.parametrize("method, cls, args", [(fm.GAM, "GAM", GAM_ARGS), (fm.CFlat, "C_Flat", CFLAT_BASIC)],
                         ids=["gam", "cflat"])
def test_infty_as_shipped_ascends_the_gradient_norm_by_one(infty_optim, method, cls, args):
    """INFTY 0.1.2 as released never sets the gradient-norm ascent radius, so it moves ε₂ by 1.0 instead
    of norm_rho (GAM) or rho (C-Flat): its trajectory is ours with that radius set to 1.0."""
    model = _model()
    theirs = copy.deepcopy(model)
    shipped = _infty_run(theirs, _infty(getattr(infty_optim, cls), theirs, SETTINGS[0], args))
    ours = _ours(copy.deepcopy(model), method, SETTINGS[0], **args)
    assert _max_diff(ours, shipped) > 1e-4
    if method is fm.GAM:
        # a radius of 1.0 is a large step off w: rounding grows to ~1e-12 absolute over five steps
        _assert_trajectories(_ours(model, fm.GAM, SETTINGS[0], **{**args, "norm_rho": 1.0}), shipped,
                             dict(rtol=1e-9, atol=1e-11))
