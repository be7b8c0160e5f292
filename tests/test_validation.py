"""Hostile hyperparameters (issue 13 §3): a clear error naming the argument, nothing changed; and
the Lp perturbation for p just above 1, which used to give NaN weights."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

import flatminima as fm
from flatminima.core import kernels as F
from flatminima.core.registry import Registry
from flatminima.core.validation import check_choice, check_range
from helpers import Quadratic
from test_methods import Net, bit_equal, snapshot

NORMS = [1.0001, 1.001, 1.01, 1.1, 2.0, 3.0, math.inf]


def near_ties(dtype, scale=1.0):
    """Two tensors whose large entries lie within 5e-4 of the peak (so p = 1.0001 weighs several),
    mixed signs, and some small entries."""
    g = torch.Generator().manual_seed(0)
    big = (1.0 - 1e-4 * torch.randint(0, 6, (12,), generator=g).double()) * torch.randn(12, generator=g).double().sign()
    small = 0.1 * torch.randn(8, generator=g, dtype=torch.float64)
    flat = torch.cat([big, small])[torch.randperm(20, generator=g)]
    return [(scale * flat[:15].view(5, 3)).to(dtype), (scale * flat[15:]).to(dtype)]


def dual_norm(x: torch.Tensor, q: float) -> torch.Tensor:
    """‖x‖_q in float64 without overflow: m·‖x/m‖_q."""
    m = x.abs().max()
    return m * ((x.abs() / m) ** q).sum() ** (1.0 / q) if q != math.inf else m


def naive(x: list[torch.Tensor], p: float) -> torch.Tensor:
    """The textbook formula sign(x)|x|^{q−1}/‖x‖_q^{q−1} in float64 (NaN where it under/overflows)."""
    flat = torch.cat([t.flatten() for t in x]).double()
    if p == math.inf:
        return flat.sign()
    q = p / (p - 1.0)
    return flat.sign() * flat.abs() ** (q - 1.0) / (flat.abs() ** q).sum() ** ((q - 1.0) / q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", NORMS)
def test_lp_dual_direction_near_one_is_finite_and_the_maximiser(p, dtype):
    """‖d‖_p = 1 and ⟨g, d⟩ = ‖g‖_q (the value of the maximiser), for any scale of g; equal to the
    naive float64 formula where that is finite."""
    q = 1.0 if p == math.inf else p / (p - 1.0)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for scale in (2.0 ** -20, 1.0, 2.0 ** 20):  # powers of two: the scaled inputs are exact
        x = near_ties(dtype, scale)
        d = torch.cat([t.flatten() for t in F.dual_direction(x, p)]).double()
        g = torch.cat([t.flatten() for t in x]).double()
        assert d.isfinite().all()
        assert torch.linalg.vector_norm(d, p).item() == pytest.approx(1.0, rel=tol)
        assert (g @ d).item() == pytest.approx(dual_norm(g, q).item(), rel=tol)
        want = naive([t / scale for t in x], p)  # the direction is scale-invariant
        assert want.isfinite().all()
        # float32 rounds |g|/max|g| once; the power q − 1 multiplies that relative error by q − 1
        rtol = 1e-9 if dtype == torch.float64 else 2e-7 * max(1.0, q - 1.0)
        torch.testing.assert_close(d, want, rtol=rtol, atol=1e-12)
    if p == 1.0001:  # the case the issue reported: the naive formula is NaN at scale 1 here
        assert not naive(near_ties(torch.float64, 2.0 ** 20), p).isfinite().all()


def test_lp_dual_direction_tends_to_the_l1_maximiser():
    """p = 1 is accepted: the whole radius on the entries of largest |g|, shared equally (the dual of
    L1 is L∞, ⟨g, d⟩ = ‖g‖_∞); p → 1⁺ tends to it."""
    x = [torch.tensor([[3.0, -1.0], [0.5, 2.0]], dtype=torch.float64), torch.tensor([-3.0, 0.0], dtype=torch.float64)]
    want = [torch.tensor([[0.5, 0.0], [0.0, 0.0]], dtype=torch.float64), torch.tensor([-0.5, 0.0], dtype=torch.float64)]
    for p, atol in ((1.0, 0.0), (1.0 + 1e-9, 1e-9)):  # p > 1: 2^{−1/p} on each of the two peaks
        got = F.dual_direction(x, p)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=atol)
    assert F.dual_direction([torch.zeros(3)], 1.0001)[0].eq(0).all()  # a zero gradient: no perturbation


@pytest.mark.parametrize("p", [1.0001, 1.001, 1.01])
def test_sam_near_l1_takes_the_closed_form_step(p):
    """SAM(norm=p) on ½xᵀAx: w ← w − lr·A(w + ρ·d(g)), d the maximiser (the issue saw NaN weights)."""
    model = Quadratic()
    x = model.flat().detach().clone()
    opt = fm.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, norm=p)
    opt.step(model.closure())
    g = model.A @ x
    eps = 0.05 * naive([g / g.abs().max()], p)
    assert model.flat().isfinite().all()
    torch.testing.assert_close(model.flat().detach(), x - 0.1 * model.A @ (x + eps), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sam_near_l1_stays_finite_in_low_precision(dtype):
    net = Net(dtype)
    opt = fm.SAM(torch.optim.SGD(net.parameters(), lr=0.1), rho=0.05, norm=1.0001)
    opt.step(net.closure())
    assert all(p.isfinite().all() for p in net.parameters())


# --------------------------------------------------------------------------------------------
# total_steps and schedule outputs

BAD_TOTAL = ["abc", -1, 0, float("nan"), True, 2.5]


@pytest.mark.parametrize("name, hp", [("sam", {}), ("sam", {"schedule": "cosine"}), ("aesam", {}), ("lpfsgd", {}),
                                      ("rwp", {"schedule": lambda t: 1.0})])
@pytest.mark.parametrize("total", BAD_TOTAL, ids=repr)
def test_total_steps_is_checked_whatever_the_schedule(name, hp, total):
    net = Net()
    base = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"Invalid total_steps: .*expected an int >= 1"):
        fm.create(name, base, total_steps=total, **hp)
    assert "initial_lr" not in base.param_groups[0]


class Negative(fm.schedules.StrengthSchedule):
    def __call__(self, step, group):
        return -1.0 if step == 1 else 1.0


@pytest.mark.parametrize("name", ["sam", "rwp", "gasam", "randomsearchsam"])
@pytest.mark.parametrize("schedule", [lambda t: 1.0 if t == 0 else -1.0, lambda t: 1.0 if t == 0 else float("nan"),
                                      lambda t: 1.0 if t == 0 else math.inf, lambda t: 1.0 if t == 0 else "abc",
                                      lambda t: 1.0 if t == 0 else None, Negative()],
                         ids=["-1", "nan", "inf", "abc", "None", "subclass"])
def test_bad_schedule_output_is_refused_before_weights_move(name, schedule):
    """A multiplier < 0 (ascent turned descent), NaN or not a number is refused naming the schedule,
    the step and the value, with weights, optimizer state and step count as they were."""
    net = Net()
    opt = fm.create(name, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), schedule=schedule)
    opt.step(net.closure())  # step 0 is fine
    before, momentum = snapshot(net), [opt.base.state[p]["momentum_buffer"].clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=r"Invalid schedule output at step 1: .*expected a finite number >= 0"):
        opt.step(net.closure())
    assert bit_equal(before, snapshot(net)) and opt.step_count == 1
    assert bit_equal(momentum, [opt.base.state[p]["momentum_buffer"] for p in net.parameters()])


def test_lr_schedule_refuses_zero_initial_lr_and_runs_a_warmup_from_zero():
    """ρ·lr_t/lr_0 is undefined for lr_0 = 0: refused at the first step, nothing changed. A warm-up
    from 0 through an LR scheduler keeps initial_lr at the base lr: ρ_t = ρ·lr_t/lr_base."""
    net = Net()
    opt = fm.SAM(torch.optim.SGD(net.parameters(), lr=0.0), rho=0.05, schedule="lr")
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"schedule 'lr'.*initial_lr = 0.0 at step 0"):
        opt.step(net.closure())
    assert bit_equal(before, snapshot(net)) and opt.step_count == 0

    net = Net()
    opt = fm.SAM(torch.optim.SGD(net.parameters(), lr=0.1), rho=0.05, schedule="lr")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: t / 10)
    assert opt.strengths() == [0.0]
    opt.step(net.closure())
    assert bit_equal(before, snapshot(net))  # lr 0 and ρ 0: the step moves nothing
    sched.step()
    assert opt.strengths() == [pytest.approx(0.05 * 0.1)]


def test_built_in_schedules_refuse_negative_ends():
    for cls in (fm.schedules.Linear, fm.schedules.Cosine):
        with pytest.raises(ValueError, match="Invalid start"):
            cls(10, -1.0, 1.0)
        with pytest.raises(ValueError, match="Invalid end"):
            cls(10, 0.0, float("nan"))
    with pytest.raises(ValueError, match=r"Invalid p at step 3: 1.5"):
        fm.schedules.Probability(lambda t: 1.5).probability(3)


# --------------------------------------------------------------------------------------------
# every numeric hyperparameter of every registered method

OPTIONAL_NUMBERS = {"total_steps", "noisy_ranks"}  # numbers whose default is None
EXTRA = {("mrwp", "noisy_ranks"): {"parallel": True}}


def _defaults(name):
    params = inspect.signature(fm.get(name).__init__).parameters
    shell = inspect.signature(fm.FlatOptimizer.__init__).parameters
    return {k: (params[k] if k in params else shell[k]).default for k in fm.hyperparameters(name)}


def _of_type(kind):
    out = []
    for name in fm.available():
        for k, default in _defaults(name).items():
            number = isinstance(default, (int, float)) and not isinstance(default, bool) or k in OPTIONAL_NUMBERS
            if kind == "number" and number or kind == "bool" and isinstance(default, bool) \
                    or kind == "str" and isinstance(default, str) and k != "norm":
                out.append((name, k))
    return out


def _model_kwargs(name):
    if not fm.methods.needs_model(name):
        return {}
    pytest.importorskip("peft")
    from test_lora import make
    return {"model": make(targets=("fc1",))}


def _refuses(name, kwargs, arg):
    net = Net(torch.float64)
    extra = _model_kwargs(name)
    params = [p for p in extra["model"].parameters() if p.requires_grad] if extra else net.parameters()
    base = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    with pytest.raises(ValueError, match=rf"Invalid {arg}\b.*expected"):
        fm.create(name, base, **extra, **kwargs)
    assert [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups] == groups and not base.state


def test_registry_has_the_hyperparameters_this_file_checks():
    numbers = _of_type("number")
    for pair in [("sam", "rho"), ("sam", "norm"), ("stochasticsam", "p"), ("mrwp", "noisy_weight"),
                 ("ssam", "fraction"), ("ssam", "sparsity"), ("aesam", "decay"), ("rwp", "fisher_decay"),
                 ("aesam", "c_start"), ("aesam", "c_end"), ("asam", "eta"), ("gasam", "step_size"),
                 ("flatlora", "noisy_weight"), ("lpfsgd", "total_steps"), ("sam", "seed")]:
        assert pair in numbers
    assert len(numbers) > 60 and ("sam", "different_batches") in _of_type("bool")


NUMERIC_CASES = [(n, a, bad) for n, a in _of_type("number") for bad in (True, False, float("nan"), math.inf, "abc")
                 if not (a == "norm" and bad == math.inf)]  # norm = inf is L∞


@pytest.mark.parametrize("name, arg, bad", NUMERIC_CASES, ids=[f"{n}-{a}-{b!r}" for n, a, b in NUMERIC_CASES])
def test_every_numeric_hyperparameter_refuses_bools_nan_and_strings(name, arg, bad):
    _refuses(name, {arg: bad, **EXTRA.get((name, arg), {})}, arg)


@pytest.mark.parametrize("name, arg", _of_type("bool"), ids=[f"{n}-{a}" for n, a in _of_type("bool")])
def test_every_flag_refuses_non_bools(name, arg):
    for bad in (1, "yes"):
        _refuses(name, {arg: bad}, arg)


@pytest.mark.parametrize("name, arg", _of_type("str"), ids=[f"{n}-{a}" for n, a in _of_type("str")])
def test_every_choice_refuses_unknown_values(name, arg):
    for bad in (5, True, "no-such-choice"):
        _refuses(name, {arg: bad}, arg)


@pytest.mark.parametrize("name", ["flatlora", "samlora"])
@pytest.mark.parametrize("model", [None, "abc", nn.Linear(2, 2)], ids=["None", "str", "no-lora"])
def test_methods_needing_a_model_refuse_a_missing_one(name, model):
    net = Net()
    with pytest.raises(ValueError, match=r"Invalid model\b.*expected"):
        fm.create(name, torch.optim.SGD(net.parameters(), lr=0.1), model=model)


@pytest.mark.parametrize("factory, arg", [
    (lambda **kw: fm.LETS(fm.SAM(torch.optim.SGD(Net().parameters(), lr=0.1)), **{"lr": 0.1, **kw}), "lr"),
    (lambda **kw: fm.LETS(fm.SAM(torch.optim.SGD(Net().parameters(), lr=0.1)), lr=0.1, **kw), "fd_step"),
    (lambda **kw: fm.LETS(fm.SAM(torch.optim.SGD(Net().parameters(), lr=0.1)), lr=0.1, **kw), "update_every"),
    (lambda **kw: fm.SAF(10, 3, **kw), "temperature"), (lambda **kw: fm.SAF(10, 3, **kw), "weight"),
    (lambda **kw: fm.SAF(10, 3, **kw), "epochs_ago"), (lambda **kw: fm.MESA(Net(), **kw), "decay"),
    (lambda **kw: fm.EMA(Net(), **kw), "decay"), (lambda **kw: fm.SWA(Net(), **kw), "every"),
    (lambda **kw: fm.SWAD(Net(), **kw), "tolerance"), (lambda **kw: fm.SWAD(Net(), **kw), "n_start"),
])
def test_averaging_trajectory_and_lets_refuse_bools_nan_and_strings(factory, arg):
    for bad in (True, False, float("nan"), "abc"):
        with pytest.raises(ValueError, match=rf"Invalid {arg}\b"):
            factory(**{arg: bad})


# --------------------------------------------------------------------------------------------
# the registry and the checks themselves

def test_registering_a_taken_name_or_alias_is_refused():
    reg: Registry[int] = Registry("thing")
    reg.register("alpha", "a-1", "a_1")(1)  # aliases equal after normalization are one name
    with pytest.raises(ValueError, match=r"Invalid thing: 'ALPHA' \(expected a thing not registered yet\)"):
        reg.register("ALPHA")(2)
    with pytest.raises(ValueError, match=r"Invalid thing: 'a1'"):
        reg.register("beta", "a1")(3)
    assert reg.names() == ["alpha"] and reg.get("alpha") == 1 and "beta" not in reg  # nothing half-added
    before = fm.available()
    with pytest.raises(ValueError, match=r"Invalid method name: 'SAM'"):
        fm.register("SAM")(type("Other", (fm.FlatOptimizer,), {}))
    assert fm.available() == before and fm.get("sam") is fm.SAM


def test_checks_name_the_argument_and_the_range():
    assert check_range("x", 1, 0.0, 1.0) == 1.0
    with pytest.raises(ValueError, match=r"Invalid x: 1 \(expected a number in \[0.0, 1.0\)\)"):
        check_range("x", 1, 0.0, 1.0, high_open=True)
    with pytest.raises(ValueError, match=r"Invalid x: True"):
        check_range("x", True, 0.0, 1.0)
    assert check_choice("c", True, (False, True)) is True
    with pytest.raises(ValueError, match=r"Invalid c: True"):
        check_choice("c", True, (1, 2))
