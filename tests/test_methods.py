"""The suite every registered method must pass (DESIGN.md §8.2–8.3)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import flatminima as fm
from helpers import Quadratic

# A meaningful, fast configuration of every registered method.
CASES = {
    "base": {},
    "sam": {"rho": 0.05},
    "asam": {"rho": 0.5},
    "layersam": {"rho": 0.01},
    "gasam": {"epsilon": 0.01, "steps": 2},
    "multistepsam": {"epsilon": 0.05, "steps": 2},
    "looksam": {"rho": 0.05, "k": 2},
    "stochasticsam": {"rho": 0.05, "p": 0.5},
    "aesam": {"rho": 0.05},
    "ssam": {"rho": 0.05, "sparsity": 0.5, "interval": 2},
    "randomsearchsam": {"rho": 0.05, "candidates": 3},
    "rwp": {"sigma": 0.05, "fisher_eta": 1.0},
    "mrwp": {"sigma": 0.05},
    "lpfsgd": {"sigma": 0.05, "samples": 3},
    "gsam": {"rho": 0.05, "alpha": 0.4},
    "wsam": {"rho": 0.05, "gamma": 0.9},
    "friendlysam": {"rho": 0.05, "sigma": 1.0, "lmbda": 0.9},
    "vasso": {"rho": 0.05, "theta": 0.9},
    "fishersam": {"rho": 0.05, "eta": 1.0},
    "gam": {"rho": 0.05, "norm_rho": 0.02},
    "cflat": {"rho": 0.05, "lamb": 0.2},
}
NAMES = sorted(CASES)
STRENGTH = {"gasam": "epsilon", "multistepsam": "epsilon", "rwp": "sigma", "mrwp": "sigma", "lpfsgd": "sigma"}


def test_registry_is_covered():
    # Flat-LoRA and SAM-LoRA need a PEFT model: tests/test_lora.py checks them on one.
    assert fm.available() == sorted(NAMES + ["flatlora", "samlora"])


def strength_key(name):
    return STRENGTH.get(name, "rho")


class Net(nn.Module):
    def __init__(self, dtype=torch.float32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(16, 6, generator=g).to(dtype)
        self.y = torch.randint(0, 3, (16,), generator=g)

    def closure(self, fail_on_call: int | None = None):
        calls = [0]

        def closure(backward: bool = True):
            calls[0] += 1
            if fail_on_call is not None and calls[0] == fail_on_call:
                raise RuntimeError("boom")
            loss = nn.functional.cross_entropy(self.net(self.x).float(), self.y)
            if backward:
                loss.backward()
            return loss.detach()

        return closure


def snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def bit_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) and x.dtype == y.dtype for x, y in zip(a, b))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("make_base", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2),
], ids=["sgd", "adamw"])
def test_zero_strength_is_the_base_optimizer_bit_for_bit(name, make_base):
    hp = dict(CASES[name])
    if name != "base":
        hp[strength_key(name)] = 0.0
    if name in ("looksam", "gsam"):
        hp["alpha"] = 0.0  # LookSAM's reuse term and GSAM's g⊥ are normalized: they vanish only with α = 0
    if name == "gam":
        hp.update(grad_beta_3=0.0, grad_gamma=0.0)  # GAM descends g₁ + g₃ − γ·(…): the base step only so
    if "steps" in hp:
        hp["steps"] = 1  # the mean of K + 1 > 2 equal gradients is g only up to rounding
    if "samples" in hp:
        hp["samples"] = 1  # likewise LPF-SGD's mean over M > 2 draws
    ref, net = Net(), Net()
    base_ref = make_base(ref.parameters())
    opt = fm.create(name, make_base(net.parameters()), **hp)
    for _ in range(4):
        base_ref.zero_grad()
        ref.closure()()
        base_ref.step()
        opt.step(net.closure())
    assert bit_equal(snapshot(ref), snapshot(net))


@pytest.mark.parametrize("name, hp", [
    ("sam", {"schedule": lambda t: 0.0}),
    ("stochasticsam", {"p": 0.0}),
    ("gasam", {"start_step": 10**9}),
    ("asam", {"schedule": "linear", "total_steps": 10**9}),  # linear ramp from 0 stays at 0 on step 0
])
def test_never_firing_schedule_is_the_base_optimizer(name, hp):
    ref, net = Net(), Net()
    base_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = fm.create(name, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), **hp)
    for _ in range(1 if "total_steps" in hp else 4):
        base_ref.zero_grad()
        ref.closure()()
        base_ref.step()
        opt.step(net.closure())
    assert bit_equal(snapshot(ref), snapshot(net))


@pytest.mark.parametrize("name", NAMES)
def test_converges_to_the_minimiser_when_strength_decays(name):
    """With ρ annealed to 0 every method must reach the minimiser x* = 0 of ½xᵀAx."""
    model = Quadratic()
    opt = fm.create(name, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5),
                    schedule=fm.schedules.Linear(150, start=1.0, end=0.0), **CASES[name])
    for _ in range(400):
        opt.step(model.closure())
    assert model.flat().detach().norm() < 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_resume_is_bit_identical(name):
    def make():
        net = Net()
        opt = fm.create(name, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), seed=3, **CASES[name])
        return net, opt

    net, opt = make()
    for _ in range(3):
        opt.step(net.closure())
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    for _ in range(5):
        opt.step(net.closure())

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    net2, opt2 = make()
    net2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.step_count == 3
    for _ in range(5):
        opt2.step(net2.closure())
    assert bit_equal(snapshot(net), snapshot(net2))
    # the restored optimizer still shares its param_groups with the base
    assert opt2.param_groups is opt2.base.param_groups


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_exact_restore_and_dtypes(name, dtype):
    """With lr = 0 the weights must come back bit-identical after every perturbed pass."""
    net = Net(dtype)
    before = snapshot(net)
    opt = fm.create(name, torch.optim.SGD(net.parameters(), lr=0.0), **CASES[name])
    seen = []

    def closure(backward=True):
        seen.append([p.detach().clone() for p in net.parameters()])
        return net.closure()(backward)

    for _ in range(4):
        opt.step(closure)
    assert bit_equal(before, snapshot(net))
    assert all(p.dtype == dtype and (p.grad is None or p.grad.dtype == dtype) for p in net.parameters())
    if name != "base":
        assert any(not bit_equal(before, s) for s in seen), "the method never perturbed the weights"
    for state in [*opt.state.values(), *opt.method_state.values()]:
        for k, v in state.items():
            if torch.is_tensor(v) and v.is_floating_point():
                assert v.dtype == dtype, k


ALWAYS_FIRE = {"stochasticsam": {"p": 1.0}, "aesam": {"c_start": -100.0, "c_end": -100.0}, "looksam": {"k": 1}}


@pytest.mark.parametrize("name", [n for n in NAMES if n != "base"])
def test_exception_in_a_perturbed_pass_restores_everything(name):
    net = Net()
    hp = {**CASES[name], **ALWAYS_FIRE.get(name, {})}
    opt = fm.create(name, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), **hp)
    opt.step(net.closure())
    opt.step(net.closure())
    before, state = snapshot(net), copy.deepcopy(opt.state_dict())
    fail_on = 1 if name in ("rwp", "lpfsgd") else 2  # the first pass at perturbed weights (RWP has no clean pass)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(net.closure(fail_on_call=fail_on))
    assert bit_equal(before, snapshot(net))
    after = opt.state_dict()
    assert after["flatminima"]["step"] == state["flatminima"]["step"] == 2
    assert after["flatminima"]["trigger"] == state["flatminima"]["trigger"]
    for k, v in state["state"].items():
        assert torch.equal(v["momentum_buffer"], after["state"][k]["momentum_buffer"])
    for k, v in state["flatminima"]["state"].items():
        for key, t in v.items():
            assert torch.equal(t, after["flatminima"]["state"][k][key])
    opt.step(net.closure())  # the optimizer is usable afterwards
    assert opt.step_count == 3


@pytest.mark.parametrize("name", NAMES)
def test_global_rng_is_untouched(name):
    net = Net()
    opt = fm.create(name, torch.optim.SGD(net.parameters(), lr=0.1), **CASES[name])
    state = torch.get_rng_state()
    for _ in range(3):
        opt.step(net.closure())
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name", NAMES)
def test_explicit_form_equals_closure_form(name):
    a, b = Net(), Net()
    opt_a = fm.create(name, torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), **CASES[name])
    opt_b = fm.create(name, torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9), **CASES[name])
    for _ in range(4):
        opt_a.step(a.closure())
        opt_b.zero_grad()
        b.closure()()  # the clean pass, run by the user's loop
        for _ in opt_b.perturbations(forward=lambda: b.closure()(backward=False)):
            b.closure()()
        opt_b.step()
    assert bit_equal(snapshot(a), snapshot(b))


def test_perturbed_context_manager():
    a, b = Net(), Net()
    opt_a = fm.SAM(torch.optim.SGD(a.parameters(), lr=0.1))
    opt_b = fm.SAM(torch.optim.SGD(b.parameters(), lr=0.1))
    opt_a.step(a.closure())
    opt_b.zero_grad()
    b.closure()()
    with opt_b.perturbed() as active:
        assert active
        b.closure()()
    opt_b.step()
    assert bit_equal(snapshot(a), snapshot(b))

    # an exception in the body leaves the weights at w
    before = snapshot(b)
    opt_b.zero_grad()
    b.closure()()
    with pytest.raises(RuntimeError, match="boom"):
        with opt_b.perturbed():
            raise RuntimeError("boom")
    assert bit_equal(before, snapshot(b))


def test_perturbed_on_a_skipped_step_keeps_the_clean_gradient():
    a, b = Net(), Net()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = fm.StochasticSAM(torch.optim.SGD(b.parameters(), lr=0.1), p=0.0)
    opt_a.zero_grad()
    a.closure()()
    opt_a.step()
    opt_b.zero_grad()
    b.closure()()
    with opt_b.perturbed() as active:
        assert not active
        b.closure()()
    opt_b.step()
    assert bit_equal(snapshot(a), snapshot(b))


def test_step_without_the_perturbed_pass_is_an_error():
    net = Net()
    opt = fm.SAM(torch.optim.SGD(net.parameters(), lr=0.1))
    before = snapshot(net)
    net.closure()()
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.step()
    assert bit_equal(before, snapshot(net)) and opt.step_count == 0


def test_random_search_needs_a_forward_only_closure():
    net = Net()
    opt = fm.RandomSearchSAM(torch.optim.SGD(net.parameters(), lr=0.1))
    before = snapshot(net)

    def closure():
        return net.closure()()

    with pytest.raises(TypeError, match="backward=False"):
        opt.step(closure)
    assert bit_equal(before, snapshot(net))


def test_lr_scheduler_and_lr_proportional_rho():
    net = Net()
    base = torch.optim.SGD(net.parameters(), lr=0.1)
    opt = fm.SAM(base, rho=0.05, schedule="lr")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.step(net.closure())
        sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.025)
    assert opt.strengths() == [pytest.approx(0.05 * 0.25)]


def test_schedules():
    s = fm.schedules
    assert s.Cosine(10)(0, {}) == 0.0 and s.Cosine(10)(10, {}) == pytest.approx(1.0)
    assert s.Cosine(10)(5, {}) == pytest.approx(0.5)
    assert s.Linear(4, 1.0, 0.0)(1, {}) == pytest.approx(0.75)
    assert s.strength_schedule(lambda t: 2.0)(3, {}) == 2.0
    assert s.ProportionalToLR()(0, {"lr": 0.05, "initial_lr": 0.1}) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="total_steps"):
        s.strength_schedule("cosine")


BAD = [
    ("sam", {"rho": -0.1}, "rho"),
    ("sam", {"rho": float("nan")}, "rho"),
    ("sam", {"norm": 0.5}, "norm"),
    ("sam", {"norm": "two"}, "norm"),
    ("sam", {"normalization": "layer"}, "normalization"),
    ("sam", {"schedule": "sometimes"}, "schedule"),
    ("sam", {"schedule": "cosine", "total_steps": 0}, "total_steps"),
    ("sam", {"seed": -1}, "seed"),
    ("sam", {"rhoo": 0.1}, "rhoo"),
    ("asam", {"eta": -1.0}, "eta"),
    ("asam", {"granularity": "layer"}, "granularity"),
    ("gasam", {"steps": 0}, "steps"),
    ("gasam", {"epsilon": -1.0}, "epsilon"),
    ("gasam", {"norm": 3}, "norm"),
    ("gasam", {"granularity": "block"}, "granularity"),
    ("gasam", {"scale": "sqrt"}, "scale"),
    ("gasam", {"step_size": 0}, "step_size"),
    ("gasam", {"start_step": -1}, "start_step"),
    ("multistepsam", {"steps": 0}, "steps"),
    ("looksam", {"k": 0}, "k"),
    ("looksam", {"alpha": -0.5}, "alpha"),
    ("stochasticsam", {"p": 1.5}, "p"),
    ("aesam", {"decay": 1.0}, "decay"),
    ("aesam", {"c_start": float("inf")}, "c_start"),
    ("ssam", {"sparsity": 1.0}, "sparsity"),
    ("ssam", {"sparsity": -0.1}, "sparsity"),
    ("ssam", {"mask": "magnitude"}, "mask"),
    ("ssam", {"interval": 0}, "interval"),
    ("ssam", {"fraction": 2.0}, "fraction"),
    ("randomsearchsam", {"candidates": 0}, "candidates"),
    ("rwp", {"sigma": -0.01}, "sigma"),
    ("rwp", {"noise": "gaussian"}, "noise"),
    ("rwp", {"fisher_eta": -1.0}, "fisher_eta"),
    ("rwp", {"fisher_decay": 1.0}, "fisher_decay"),
    ("mrwp", {"noisy_weight": 1.5}, "noisy_weight"),
    ("mrwp", {"different_batches": "yes"}, "different_batches"),
    ("lpfsgd", {"samples": 0}, "samples"),
    ("lpfsgd", {"alpha": -1.0}, "alpha"),
]


@pytest.mark.parametrize("name, hp, arg", BAD, ids=[f"{n}-{a}" for n, _, a in BAD])
def test_bad_hyperparameters_raise_and_touch_nothing(name, hp, arg):
    net = Net()
    base = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    groups_before = [dict((k, v) for k, v in g.items() if k != "params") for g in base.param_groups]
    before = snapshot(net)
    with pytest.raises(ValueError, match=arg) as info:
        fm.create(name, base, **hp)
    assert "expected" in str(info.value)
    assert [dict((k, v) for k, v in g.items() if k != "params") for g in base.param_groups] == groups_before
    assert bit_equal(before, snapshot(net)) and not base.state


def test_unknown_method_and_per_group_strength_validation():
    net = Net()
    with pytest.raises(ValueError, match="method name.*expected one of"):
        fm.create("sharpness", torch.optim.SGD(net.parameters(), lr=0.1))
    base = torch.optim.SGD([{"params": net.parameters(), "rho": -1.0}], lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        fm.SAM(base)
    with pytest.raises(TypeError, match="Optimizer"):
        fm.SAM(net.parameters())
    other = Net()
    for method in ("sam", "rwp"):  # a scope that matches no parameter of the optimizer
        with pytest.raises(ValueError, match="scope"):
            fm.create(method, torch.optim.SGD(net.parameters(), lr=0.1), scope=list(other.parameters()))


def test_names_are_forgiving():
    net = Net()
    assert isinstance(fm.create("GA-SAM", torch.optim.SGD(net.parameters(), lr=0.1)), fm.GASAM)
    assert isinstance(fm.create("Look_SAM", torch.optim.SGD(net.parameters(), lr=0.1)), fm.LookSAM)
    assert "rho" in fm.hyperparameters("sam") and "scope" in fm.hyperparameters("sam")


def test_scope_limits_the_perturbation():
    """Only scoped tensors move; the others still descend along the perturbed gradient."""
    model = Quadratic()
    opt = fm.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, scope=[model.W])
    A, x = model.A, model.flat().detach().clone()
    opt.step(model.closure())
    g = A @ x
    eps = torch.zeros_like(x)
    eps[:6] = 0.05 * g[:6] / g[:6].norm()
    torch.testing.assert_close(model.flat().detach(), x - 0.1 * A @ (x + eps), rtol=0, atol=1e-12)


def test_name_scope():
    net = Net()
    weights = fm.params_by_name(net, include=r"weight$")
    assert [p.shape for p in weights] == [torch.Size([8, 6]), torch.Size([3, 8])]
    assert fm.params_by_name(net, exclude=r"bias") == weights
    a, b = Net(), Net()
    opt_a = fm.SAM(torch.optim.SGD(a.parameters(), lr=0.1), scope=fm.params_by_name(a, exclude="bias"))
    opt_b = fm.SAM(torch.optim.SGD(b.parameters(), lr=0.1), scope=lambda p: p.dim() == 2)
    for _ in range(3):
        opt_a.step(a.closure())
        opt_b.step(b.closure())
    assert bit_equal(snapshot(a), snapshot(b))
    with pytest.raises(ValueError, match="include"):
        fm.params_by_name(net, include="(")
    with pytest.raises(ValueError, match="at least one"):
        fm.params_by_name(net, include="conv")


# --------------------------------------------------------------------------------------------
# SSAM and ASAM against their official code (issue 13 §5)


class Ties(nn.Module):
    """``L = ½‖a[:3]‖² + ½‖b[:1]‖²``: 16 of the 20 gradient entries are exactly zero (dead units)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.arange(1.0, 13.0, dtype=torch.float64))
        self.b = nn.Parameter(torch.full((8,), 0.5, dtype=torch.float64))

    def closure(self):
        def closure(backward: bool = True):
            loss = 0.5 * (self.a[:3] ** 2).sum() + 0.5 * (self.b[:1] ** 2).sum()
            if backward:
                loss.backward()
            return loss.detach()
        return closure


def test_ssam_fisher_mask_keeps_exactly_ceil_entries_under_zero_gradient_ties():
    """⌈(1 − s)·n⌉ entries, the zero-Fisher ties filled by lowest index over the whole scope."""
    model = Ties()
    opt = fm.SSAM(torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.7, interval=1)
    opt.step(model.closure())
    mask = torch.cat([opt.method_state[p]["ssam.mask"].flatten() for p in (model.a, model.b)])
    # n = 20, keep 6: the 4 nonzero entries (a[0:3], b[0]), then a[3], a[4]
    assert mask.nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 12]
    assert [fm.methods.keep_count(s, n) for s, n in ((0.7, 10), (0.5, 5), (0.0, 7), (0.999, 10))] == [3, 3, 7, 1]


@pytest.mark.parametrize("normalize", ["masked", "full"])
def test_ssam_normalizations_are_the_closed_forms(normalize):
    """``masked``: ε = ρ·(m⊙g)/‖m⊙g‖; ``full`` (official code): ε = ρ·(m⊙g)/‖g‖; m = top-4 of g²."""
    model = Quadratic()
    x = model.flat().detach().clone()
    opt = fm.SSAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, sparsity=0.5, normalize=normalize)
    opt.step(model.closure())
    g = model.A @ x
    m = torch.zeros(8, dtype=torch.float64)
    m[torch.argsort(g ** 2, descending=True)[:4]] = 1.0
    eps = 0.05 * m * g / ((m * g).norm() if normalize == "masked" else g.norm())
    torch.testing.assert_close(model.flat().detach(), x - 0.1 * model.A @ (x + eps), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="Invalid norm.*normalize='full'"):
        fm.SSAM(torch.optim.SGD(model.parameters(), lr=0.1), normalize="full", norm=3)
    with pytest.raises(ValueError, match="Invalid normalize"):
        fm.SSAM(torch.optim.SGD(model.parameters(), lr=0.1), normalize="global")


def test_asam_unscaled_is_the_official_rule_for_tensors_not_named_weight():
    """``unscaled=params_by_name(net, exclude="weight")`` equals SamsungLabs/ASAM's ascent step:
    T = |w| + η for names containing ``weight`` (LayerNorm's too), T = 1 for the biases."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    ref = copy.deepcopy(net)
    rho, eta, lr = 0.5, 0.01, 0.1

    def loss(model):
        return ((model(x) - y) ** 2).mean()

    # the official algorithm, written out: g ← T g for weights, ε = ρ·T g'/‖g'‖ with g' = T g
    grads = torch.autograd.grad(loss(ref), list(ref.parameters()))
    named = list(ref.named_parameters())
    t = [p.detach().abs() + eta if "weight" in n else torch.ones_like(p) for n, p in named]
    norm = torch.stack([(ti * g).norm() for ti, g in zip(t, grads)]).norm()
    eps = [rho * ti * ti * g / norm for ti, g in zip(t, grads)]
    with torch.no_grad():
        for (_, p), e in zip(named, eps):
            p.add_(e)
    grads_at = torch.autograd.grad(loss(ref), list(ref.parameters()))
    want = [p.detach() - e - lr * g for (_, p), e, g in zip(named, eps, grads_at)]

    opt = fm.ASAM(torch.optim.SGD(net.parameters(), lr=lr), rho=rho, eta=eta,
                  unscaled=fm.params_by_name(net, exclude="weight"))

    def closure(backward=True):
        value = loss(net)
        if backward:
            value.backward()
        return value.detach()

    opt.step(closure)
    for p, w in zip(net.parameters(), want):
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="Invalid unscaled"):
        fm.ASAM(torch.optim.SGD(net.parameters(), lr=lr), unscaled=5)


@pytest.mark.parametrize("name", NAMES)
def test_per_tensor_ops_equal_the_foreach_kernels(name):
    """``foreach=False`` runs every list op tensor by tensor: the same steps (float64, to rounding),
    and the switch does not outlive the optimizer's own steps."""
    from flatminima.core import foreach

    nets = [Net(torch.float64), Net(torch.float64)]
    opts = [fm.create(name, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), foreach=flag, **CASES[name])
            for net, flag in zip(nets, (True, False))]
    for _ in range(4):
        for net, opt in zip(nets, opts):
            opt.step(net.closure())
            assert foreach._ENABLED.get() is True
    for a, b in zip(snapshot(nets[0].net), snapshot(nets[1].net)):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-12)


def test_foreach_must_be_a_bool_or_none():
    with pytest.raises(ValueError, match="foreach"):
        fm.SAM(torch.optim.SGD(Net().parameters(), lr=0.1), foreach="yes")


def test_unregister_removes_a_method_and_its_aliases():
    @fm.register("tmp-sam", "tmp-alias")
    class TmpSAM(fm.SAM):
        pass

    assert fm.get("tmp_alias") is TmpSAM and "tmp-sam" in fm.available()
    assert fm.unregister("TMP-ALIAS") is TmpSAM
    assert "tmp-sam" not in fm.available()
    for name in ("tmp-sam", "tmp-alias"):
        with pytest.raises(ValueError, match="Invalid method name"):
            fm.get(name)
    with pytest.raises(ValueError, match="Invalid method name: 'tmp-sam'"):
        fm.unregister("tmp-sam")
