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


# -- LETS through TrainStep: accumulation, AMP, DDP -------------------------------------------------

def _mlp(bn: bool = False):
    """(BatchNorm in training mode makes micro-batches differ from their concatenation: off for the
    comparisons.)"""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8) if bn else nn.Identity(), nn.Tanh(),
                         nn.Linear(8, 1)).double()


def _batches(seed: int, n: int = 4, rows: int = 6):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 5, generator=g, dtype=torch.float64), torch.randn(rows, 1, generator=g, dtype=torch.float64))
            for _ in range(n)]


def _mse(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def _cat(batches):
    return tuple(torch.cat(parts) for parts in zip(*batches))


def _closure_for(model, batch):
    def closure(backward=True):
        loss = _mse(model, batch)
        if backward:
            loss.backward()
        return loss.detach()
    return closure


def _sam(model, **kw):
    return fm.SAM(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), rho=0.05, **kw)


@pytest.mark.parametrize("scaler", [False, True])
def test_train_step_equals_the_closure_form(scaler):
    """Over 3 steps, 4 micro-batches with ``accumulation="full"`` equal one closure step on their
    concatenation (float64; a GradScaler scales by powers of two, exactly); the strength moves."""
    m1, m2 = _mlp(), _mlp()
    l1 = LETS(_sam(m1), lr=0.5, model=m1)
    l2 = LETS(_sam(m2), lr=0.5)
    amp = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaler else None
    engine = fm.TrainStep(m2, l2.optimizer, _mse, accumulation="full", bn="all", scaler=amp)
    for t in range(3):
        train, val = _batches(t), _batches(100 + t)
        l1.step(_closure_for(m1, _cat(train)), _closure_for(m1, _cat(val)))
        result = l2.train_step(engine, train, val)
        assert result.skipped is (False if scaler else None)
        assert l2.strength == pytest.approx(l1.strength, rel=1e-9, abs=1e-15)
        assert l2.statistics["gap"] == pytest.approx(l1.statistics["gap"], rel=1e-9)
        for a, b in zip(m2.state_dict().values(), m1.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert l2.strength != 0.05 and l2.optimizer.step_count == 3


def test_train_step_leaves_the_strength_on_an_amp_skipped_step():
    from helpers import InfGrad

    model = _mlp()
    lets = LETS(_sam(model), lr=0.5)
    calls = {"n": 0, "at": -1}

    def loss_fn(m, batch):
        loss = _mse(m, batch)
        if calls["n"] == calls["at"]:
            loss = loss + 0.0 * InfGrad.apply(next(m.parameters())).sum()
        calls["n"] += 1
        return loss

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    engine = fm.TrainStep(model, lets.optimizer, loss_fn, scaler=scaler)
    # Calls per update with 2 micro-batches: probe 0-2 (clean, clean, perturbed), real step 3-5,
    # L_val 6-7, L_tr 8-9. An overflow in the probe or at w⁺ keeps the strength (the step is taken);
    # one in the real step skips it.
    for at, skipped, count in ((2, False, 1), (3, True, 1), (6, False, 2), (9, False, 3), (-1, False, 4)):
        calls["n"], calls["at"] = 0, at
        before, params = lets.strength, [p.detach().clone() for p in model.parameters()]
        result = lets.train_step(engine, _batches(at, n=2), _batches(50, n=2))
        assert calls["n"] == (6 if at in (2, 3) else 10)  # no passes at w⁺ after an overflow
        assert result.skipped is skipped
        assert (lets.strength == before) is (at != -1)
        assert lets.optimizer.step_count == count
        moved = any(not torch.equal(a, b) for a, b in zip(params, model.parameters()))
        assert moved is not skipped


def test_train_step_refuses_an_engine_of_another_optimizer():
    model = _mlp()
    lets = LETS(_sam(model), lr=0.5)
    other = fm.TrainStep(model, _sam(model), _mse)
    with pytest.raises(ValueError, match="engine"):
        lets.train_step(other, _batches(0), _batches(1))


def _ddp_worker(rank, world, store, out, names):
    import datetime
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        model = _mlp()
        ddp = nn.parallel.DistributedDataParallel(model)
        lets = LETS(_sam(model, sync_perturbation=True), lr=0.5)
        engine = fm.TrainStep(ddp, lets.optimizer, _mse, bn="all")
        strengths = []
        for t in range(3):
            train, val = _batches(t, n=1, rows=12), _batches(100 + t, n=1, rows=12)
            mine = [(x[rank::world], y[rank::world]) for x, y in train]
            lets.train_step(engine, mine, [(x[rank::world], y[rank::world]) for x, y in val])
            strengths.append(lets.strength)
        torch.save({"strengths": strengths, "weights": [p.detach() for p in model.parameters()]},
                   os.path.join(out, f"rank{rank}.pt"))
    except BaseException:
        import traceback
        from pathlib import Path

        Path(out, f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)
    dist.destroy_process_group()


def test_train_step_under_ddp_learns_one_strength_equal_to_one_process(tmp_path):
    """2 gloo ranks on half batches with a shared ε: every rank learns the same strength (the
    hypergradient averaged over ranks), equal to one process on the whole batches, and so are the
    weights."""
    from helpers import spawn_ranks

    got = spawn_ranks(_ddp_worker, tmp_path, 2, [], 120)
    model = _mlp()
    lets = LETS(_sam(model, sync_perturbation=True), lr=0.5)
    engine = fm.TrainStep(model, lets.optimizer, _mse, bn="all")
    want = []
    for t in range(3):
        lets.train_step(engine, _batches(t, n=1, rows=12), _batches(100 + t, n=1, rows=12))
        want.append(lets.strength)
    assert got[0]["strengths"] == got[1]["strengths"]
    assert want[-1] != 0.05
    for rank in got:
        assert rank["strengths"] == pytest.approx(want, rel=1e-9)
        for a, b in zip(rank["weights"], model.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)
