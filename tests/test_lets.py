"""LETS: the hypergradient against a finite difference of the same objective on quadratics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flatminima as fm
from flatminima.lets import LETS
from helpers import Quadratic

LR = 0.1


def _val_target(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    M = torch.randn(8, 8, generator=g, dtype=torch.float64)
    return M @ M.T / 8 + 0.5 * torch.eye(8, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)


def _val_loss(model: Quadratic, val_seed: int) -> torch.Tensor:
    B, c = _val_target(val_seed)
    x = model.flat() - c
    return 0.5 * x @ B @ x


def _val_closure(model: Quadratic, val_seed: int):
    def closure():
        loss = _val_loss(model, val_seed)
        loss.backward()
        return loss.detach()
    return closure


def _method(name: str, model: Quadratic, strength: float, lr: float = LR) -> fm.FlatOptimizer:
    base = torch.optim.SGD(model.parameters(), lr=lr)
    return fm.SAM(base, rho=strength) if name == "sam" else fm.RWP(base, sigma=strength, noise="element", seed=7)


def _phi(name: str, strength: float, val_seed: int) -> float:
    """``½(L_val(w⁺) − L_tr(w⁺))²`` after one step of the method from the fixed start, by brute force."""
    model = Quadratic()
    _method(name, model, strength).step(model.closure())
    with torch.no_grad():
        return 0.5 * (_val_loss(model, val_seed) - model()).item() ** 2


def _lets_step(name: str, strength: float, val_seed: int, **kw) -> tuple[LETS, Quadratic]:
    model = Quadratic()
    lets = LETS(_method(name, model, strength), **{"lr": 1e-3, "fd_step": 1e-3, **kw})
    lets.step(model.closure(), _val_closure(model, val_seed))
    return lets, model


@pytest.mark.parametrize("name,strength", [("sam", 0.05), ("rwp", 0.2)])
@pytest.mark.parametrize("val_seed", [0, 1])
def test_hypergradient_equals_finite_difference_of_the_objective(name, strength, val_seed):
    lets, _ = _lets_step(name, strength, val_seed)
    delta = 1e-5
    fd = (_phi(name, strength + delta, val_seed) - _phi(name, strength - delta, val_seed)) / (2 * delta)
    assert abs(fd) > 1e-3  # a meaningful slope
    assert lets.statistics["hypergradient"] == pytest.approx(fd, rel=1e-6)


@pytest.mark.parametrize("name", ["sam", "rwp"])
def test_step_is_the_method_step_and_strength_moves_against_the_hypergradient(name):
    strength = 0.05
    reference = Quadratic()
    _method(name, reference, strength).step(reference.closure())
    for val_seed in range(4):
        lets, model = _lets_step(name, strength, val_seed, lr=1e-3)
        # The weights took exactly the method's step at the old strength.
        torch.testing.assert_close(model.flat(), reference.flat(), rtol=0, atol=0)
        hg, new = lets.statistics["hypergradient"], lets.strength
        key = lets.optimizer.strength_key
        assert all(g[key] == new for g in lets.optimizer.param_groups)
        assert new == pytest.approx(strength - 1e-3 * hg, rel=1e-12)
        # Increase exactly when the gap and its derivative have opposite signs (∂Φ/∂s < 0).
        assert (new > strength) == (hg < 0) and hg != 0


def test_both_directions_occur_and_the_finite_difference_agrees():
    signs = set()
    for val_seed in range(6):
        fd = (_phi("sam", 0.05 + 1e-5, val_seed) - _phi("sam", 0.05 - 1e-5, val_seed)) / 2e-5
        lets, _ = _lets_step("sam", 0.05, val_seed)
        assert (lets.strength > 0.05) == (fd < 0)
        signs.add(fd < 0)
    assert signs == {True, False}


def test_strength_stays_within_bounds():
    for val_seed in range(4):
        lets, _ = _lets_step("sam", 0.05, val_seed, lr=1e6, min_strength=0.01, max_strength=0.2)
        assert lets.strength in (0.01, 0.2)
        assert (lets.strength == 0.2) == (lets.statistics["hypergradient"] < 0)
    # Several steps with a big lr: always inside.
    model = Quadratic()
    lets = LETS(_method("rwp", model, 0.05), lr=10.0, min_strength=0.0, max_strength=0.1)
    for step in range(5):
        lets.step(model.closure(), _val_closure(model, step))
        assert 0.0 <= lets.strength <= 0.1
    assert lets.optimizer.step_count == 5


def test_zero_strength_uses_an_absolute_difference_step():
    lets, _ = _lets_step("sam", 0.0, 0, max_strength=0.1)
    fd = (_phi("sam", 1e-6, 0) - _phi("sam", 0.0, 0)) / 1e-6
    assert lets.statistics["hypergradient"] == pytest.approx(fd, rel=1e-4)


def test_update_every_leaves_other_steps_alone():
    model = Quadratic()
    lets = LETS(_method("sam", model, 0.05), lr=1.0, update_every=2)
    calls = []

    def val_closure():
        calls.append(1)
        return _val_closure(model, 0)()

    lets.step(model.closure(), val_closure)
    first = lets.strength
    assert first != 0.05 and calls == [1]
    lets.step(model.closure(), val_closure)
    assert lets.strength == first and calls == [1]


def test_batchnorm_statistics_move_with_the_real_step_only():
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)
    xv, yv = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)

    def closure_for(model, a, b):
        def closure(backward=True):
            loss = nn.functional.mse_loss(model(a), b)
            if backward:
                loss.backward()
            return loss.detach()
        return closure

    plain, learned = build(), build()
    fm.SAM(torch.optim.SGD(plain.parameters(), lr=LR), rho=0.05).step(closure_for(plain, x, y))
    lets = LETS(fm.SAM(torch.optim.SGD(learned.parameters(), lr=LR), rho=0.05), lr=0.1, model=learned)
    lets.step(closure_for(learned, x, y), closure_for(learned, xv, yv))
    for a, b in zip(plain.buffers(), learned.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(plain.parameters(), learned.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rejects_bad_configuration():
    model = Quadratic()
    sam = _method("sam", model, 0.05)
    bad = [dict(lr=0.0), dict(lr=-1.0), dict(lr=float("nan")), dict(lr=1.0, min_strength=-0.1),
           dict(lr=1.0, max_strength=0.0), dict(lr=1.0, min_strength=0.2, max_strength=0.1),
           dict(lr=1.0, min_strength=0.1, max_strength=0.2),  # rho = 0.05 outside the bounds
           dict(lr=1.0, fd_step=0.0), dict(lr=1.0, update_every=0), dict(lr=1.0, model=3)]
    for kw in bad:
        with pytest.raises(ValueError, match="Invalid"):
            LETS(sam, **kw)
    with pytest.raises(ValueError, match="flatminima method"):
        LETS(torch.optim.SGD(model.parameters(), lr=LR), lr=1.0)
    with pytest.raises(ValueError, match="max_strength"):
        LETS(_method("sam", Quadratic(), 0.0), lr=1.0)  # no default bound from a zero strength
    two_groups = torch.optim.SGD([{"params": [model.W], "rho": 0.05}, {"params": [model.b], "rho": 0.1}], lr=LR)
    with pytest.raises(ValueError, match="every param group"):
        LETS(fm.SAM(two_groups), lr=1.0)
    lets = LETS(sam, lr=1.0)
    assert lets.max_strength == pytest.approx(0.5)
    with pytest.raises(ValueError, match="val_closure"):
        lets.step(model.closure(), None)
    with pytest.raises(ValueError, match="val_closure"):
        lets.step(model.closure(), lambda: None)
