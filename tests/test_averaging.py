"""Weight averaging: SWA / EMA / SWAD (flatminima.averaging), checked against hand computations in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim import swa_utils

import flatminima as fm
from flatminima.averaging import EMA, SWA, SWAD, update_bn
from helpers import Quadratic

TIGHT = dict(rtol=0, atol=1e-13)


def linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(3, 2).double()


def snapshots(k: int, model: nn.Module, seed: int = 1) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()] for _ in range(k)]


def set_weights(model: nn.Module, values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(model.parameters(), values):
            p.copy_(v)


def mean_of(snaps: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack(ts).mean(0) for ts in zip(*snaps)]


def assert_weights(module: nn.Module, expected: list[torch.Tensor], **tol) -> None:
    for p, e in zip(module.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, **(tol or TIGHT))


def flat_state(avg) -> list:
    """Every tensor and number in an averager's state_dict, for 'nothing changed' comparisons."""
    out = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            out.append(x.clone())
        elif isinstance(x, dict):
            for k in sorted(x):
                out.append(k)
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        else:
            out.append(x)

    walk(avg.state_dict())
    return out


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------ SWA


def test_swa_is_the_mean_of_the_snapshots():
    model = linear()
    snaps = snapshots(7, model)
    avg = SWA(model)
    for t, s in enumerate(snaps):
        set_weights(model, s)
        assert avg.update(t)
    assert avg.n_averaged == 7
    assert_weights(avg.module, mean_of(snaps))
    # The training model holds the last snapshot, untouched by averaging.
    assert_weights(model, snaps[-1], rtol=0, atol=0)


def test_swa_respects_start_and_every():
    model = linear()
    snaps = snapshots(12, model)
    avg = SWA(model, start=3, every=4)
    counted = []
    for t, s in enumerate(snaps):
        set_weights(model, s)
        if avg.update(t):
            counted.append(t)
    assert counted == [3, 7, 11]
    assert avg.n_averaged == 3
    assert_weights(avg.module, mean_of([snaps[t] for t in counted]))


def test_swa_steps_must_increase():
    model = linear()
    avg = SWA(model)
    avg.update(4)
    before = flat_state(avg)
    for bad in (4, 2, -1, 5.0, True):
        with pytest.raises(ValueError, match="Invalid step"):
            avg.update(bad)
    assert same(before, flat_state(avg))


# ------------------------------------------------------------------------------------------ EMA


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_follows_the_recursion(warmup):
    model = linear()
    snaps = snapshots(9, model)
    decay = 0.8
    avg = EMA(model, decay=decay, warmup=warmup, start=1, every=2)
    expected, n = None, 0
    for t, s in enumerate(snaps):
        set_weights(model, s)
        counted = avg.update(t)
        assert counted == (t >= 1 and (t - 1) % 2 == 0)
        if not counted:
            continue
        if expected is None:
            expected = [v.clone() for v in s]
        else:
            d = min(decay, (1 + n) / (10 + n)) if warmup else decay
            expected = [d * e + (1 - d) * v for e, v in zip(expected, s)]
        n += 1
    assert avg.n_averaged == n == 4
    assert_weights(avg.module, expected)
    if warmup:  # the warm-up factor really was smaller than decay at the start: (1+1)/(10+1) < 0.8
        assert avg.current_decay() == min(decay, (1 + 4) / (10 + 4))


def test_ema_averages_float_buffers_and_copies_counters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double()
    avg = EMA(model, decay=0.5)  # use_buffers=True by default
    bn = model[1]
    expected = None
    for t in range(4):
        model(torch.randn(8, 3, dtype=torch.float64))  # train mode: running stats move, counter += 1
        avg.update(t)
        rm = bn.running_mean.clone()
        expected = rm if expected is None else 0.5 * expected + 0.5 * rm
    torch.testing.assert_close(avg.module[1].running_mean, expected, **TIGHT)
    # num_batches_tracked is an integer counter: copied, never averaged (torch's EMA would truncate it).
    assert avg.module[1].num_batches_tracked.item() == bn.num_batches_tracked.item() == 4


def test_swa_with_buffers_averages_batchnorm_statistics():
    """torch's SWA function fails on the integer num_batches_tracked once it differs between
    snapshots (integer addcdiv); ours averages float buffers and copies the counter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double()
    avg = SWA(model, use_buffers=True)
    means, variances = [], []
    for t in range(5):
        model(torch.randn(8, 3, dtype=torch.float64))
        avg.update(t)
        means.append(model[1].running_mean.clone())
        variances.append(model[1].running_var.clone())
    torch.testing.assert_close(avg.module[1].running_mean, torch.stack(means).mean(0), **TIGHT)
    torch.testing.assert_close(avg.module[1].running_var, torch.stack(variances).mean(0), **TIGHT)
    assert avg.module[1].num_batches_tracked.item() == 5
    assert avg.finalize() is avg.module  # buffers averaged: no warning, no loader needed


# ------------------------------------------------------------------------------------------ SWAD


def swad_rule(losses, n_start, n_end, r):
    """The window by the paper's rule on a whole curve (evaluation indices), training stopping after
    the last one: t_s = first i with min(E[i:i+N_s]) = E[i]; t_e = first i > t_s with
    min(E[i:i+N_e]) > r·E[t_s] (shorter look-ahead at the very end), else the last evaluation."""
    ts = next(i for i in range(len(losses) - n_start + 1) if min(losses[i:i + n_start]) == losses[i])
    th = r * losses[ts]
    te = next((i for i in range(ts + 1, len(losses)) if min(losses[i:i + n_end]) > th), len(losses) - 1)
    return ts, te


EVERY = 4  # evaluation after steps 3, 7, 11, ...: evaluation i is at step 4i + 3

# (losses, n_start, n_end, r, (t_s, t_e) as evaluation indices, evaluation at which t_e is known or None)
CURVES = {
    "u_shaped": ([5, 4, 3, 2, 1.5, 1.4, 1.45, 1.5, 1.6, 1.7, 1.8, 2.0, 2.1, 2.2], 3, 2, 1.2, (5, 9), 10),
    "noisy": ([2, 1, 1.1, 0.9, 1.0, 1.2, 0.95, 1.3, 1.5, 1.0, 1.0], 3, 2, 1.2, (3, 7), 8),
    "never_overfits": ([3, 2, 1, 1, 1, 1, 1], 3, 2, 1.2, (2, 6), None),
    "immediate_plateau": ([1, 1, 1, 1, 1], 3, 6, 1.3, (0, 4), None),
    "end_before_start_known": ([1.0, 2.0, 1.5, 1.1], 3, 1, 1.2, (0, 1), 2),
    "truncated_end": ([3, 2, 1, 1.1, 1.2, 1.5, 1.6], 3, 3, 1.2, (2, 5), None),
    "n_start_1": ([2, 1, 3, 0.5], 1, 1, 1.2, (0, 2), 2),
}


@pytest.mark.parametrize("name", sorted(CURVES))
def test_swad_window_follows_the_rule(name):
    losses, n_start, n_end, r, (ts, te), known_at = CURVES[name]
    assert swad_rule(losses, n_start, n_end, r) == (ts, te)  # the table agrees with the rule as written
    model = linear()
    steps = EVERY * len(losses) + 2  # two extra steps after the last evaluation: never averaged
    snaps = snapshots(steps, model, seed=3)
    avg = SWAD(model, n_start=n_start, n_end=n_end, tolerance=r)
    for t, s in enumerate(snaps):
        set_weights(model, s)
        assert avg.update(t) == (known_at is None or t <= EVERY * known_at + 3)
        if (t + 1) % EVERY or t // EVERY >= len(losses):
            continue
        i = t // EVERY
        avg.report_validation(t, losses[i])
        # t_s is known after N_s − 1 more evaluations, t_e after N_e − 1 more.
        assert (avg.t_s is not None) == (i >= ts + n_start - 1 or (known_at is not None and i >= known_at))
        assert avg.finished == (known_at is not None and i >= known_at)
    final = avg.finalize()
    assert avg.window == (EVERY * ts + 3, EVERY * te + 3) and avg.finished
    inside = snaps[EVERY * ts + 3: EVERY * te + 4]
    assert avg.n_averaged == len(inside) == EVERY * (te - ts) + 1
    assert_weights(final, mean_of(inside))
    assert avg.threshold == pytest.approx(r * losses[ts])


def test_swad_without_a_start_raises_and_keeps_its_state():
    model = linear()
    avg = SWAD(model, n_start=3)
    for t, loss in enumerate([3.0, 2.0, 1.0, 0.5]):
        avg.update(t)
        avg.report_validation(t, loss)
    before = flat_state(avg)
    with pytest.raises(RuntimeError, match="no window start"):
        avg.finalize()
    assert same(before, flat_state(avg)) and not avg.finalized


def test_swad_memory_is_bounded():
    """Copies held between evaluations (besides the result and the running segment) stay below the
    documented bound however long the search and the plateau last."""
    n_start, n_end = 3, 4
    model = linear()
    avg = SWAD(model, n_start=n_start, n_end=n_end, tolerance=1.3)
    losses = [5 - 0.1 * i for i in range(30)] + [2.0] * 40  # a long search, then a long plateau
    for t, loss in enumerate(losses):
        avg.update(t)
        avg.report_validation(t, loss)
        held = sum((e.mean is not None) + (e.snapshot is not None) for e in avg._pending)
        if avg.phase == "search":
            assert len(avg._pending) <= n_start - 1 and held <= 2 * (n_start - 1) - 1
        else:
            assert len(avg._pending) <= n_end - 1 and held == len(avg._pending)
    # The last N_e − 1 evaluations wait for the end rule; training stopping commits them.
    assert avg.window == (30, None) and avg.n_averaged == 40 - (n_end - 1)
    avg.finalize()
    assert avg.window == (30, 69) and avg.n_averaged == 40


def test_swad_bad_reports_raise_and_change_nothing():
    model = linear()
    avg = SWAD(model)
    avg.update(0)
    avg.update(1)
    before = flat_state(avg)
    for step, loss, name in [(1, float("nan"), "loss"), (1, -1.0, "loss"), (1, torch.ones(2), "loss"),
                             (0, 1.0, "step"), (2, 1.0, "step")]:
        with pytest.raises(ValueError, match=f"Invalid {name}"):
            avg.report_validation(step, loss)
    assert same(before, flat_state(avg))
    avg.report_validation(1, torch.tensor(1.0))
    with pytest.raises(ValueError, match="Invalid step"):  # reported twice
        avg.report_validation(1, 1.0)


# ------------------------------------------------------------------------------------------ state_dict


@pytest.mark.parametrize("half", [9, 25, 37])  # SWAD: searching, candidates pending, collecting
@pytest.mark.parametrize("make", [lambda m: SWA(m, start=2, every=3), lambda m: EMA(m, decay=0.7, warmup=True),
                                  lambda m: SWAD(m, n_start=3, n_end=2, tolerance=1.2)])
def test_state_dict_resumes_exactly(make, half):
    losses = CURVES["u_shaped"][0]
    model = linear()
    snaps = snapshots(EVERY * len(losses), model, seed=5)

    def feed(avg, m, steps):
        for t in steps:
            set_weights(m, snaps[t])
            avg.update(t)
            if isinstance(avg, SWAD) and (t + 1) % EVERY == 0:
                avg.report_validation(t, losses[t // EVERY])

    reference = make(model)
    feed(reference, model, range(len(snaps)))
    first_model = linear()
    first = make(first_model)
    feed(first, first_model, range(half))
    saved = copy.deepcopy(first.state_dict())
    resumed_model = linear()
    resumed = make(resumed_model)
    resumed.load_state_dict(saved)
    feed(resumed, resumed_model, range(half, len(snaps)))
    for p, q in zip(reference.finalize().parameters(), resumed.finalize().parameters()):
        assert torch.equal(p, q)
    assert reference.n_averaged == resumed.n_averaged
    with pytest.raises(ValueError, match="Invalid state"):
        make(linear()).load_state_dict({"averaged": saved["averaged"]})


# ------------------------------------------------------------------------------------------ BatchNorm


class Net(nn.Module):
    """BatchNorm on the input (its statistics are the data's), then on a hidden layer (its statistics
    depend on the averaged weights); takes keyword inputs like a Hugging Face model."""

    def __init__(self):
        super().__init__()
        self.bn0 = nn.BatchNorm1d(3)
        self.fc = nn.Linear(3, 4)
        self.bn1 = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 1)

    def forward(self, x, labels=None):
        return self.out(self.bn1(self.fc(self.bn0(x))))


def bn_batches(n=5, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, generator=g, dtype=torch.float64) * 2 + 1,
             torch.randn(6, 1, generator=g, dtype=torch.float64)) for _ in range(n)]


@pytest.mark.parametrize("shape", ["tuple", "dict", "tensor"])
def test_finalize_recomputes_batchnorm_statistics(shape):
    torch.manual_seed(0)
    model = Net().double()
    data = bn_batches()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    avg = SWA(model)
    for t, (x, y) in enumerate(data):  # a few real training steps: running statistics move
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        avg.update(t)
    model.eval()
    model_state = copy.deepcopy(model.state_dict())
    averaged_params = [p.detach().clone() for p in avg.module.parameters()]
    avg.module.eval()
    avg.module.fc.train()  # a mixed-mode tree must come back as it was

    loader = {"tuple": data, "dict": [{"x": x, "labels": y} for x, y in data], "tensor": [x for x, _ in data]}[shape]
    final = avg.finalize(loader)

    # Independent reference 1: the input BatchNorm's cumulative statistics are the data's.
    xs = [x for x, _ in data]
    torch.testing.assert_close(final.bn0.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0), **TIGHT)
    torch.testing.assert_close(final.bn0.running_var, torch.stack([x.var(0) for x in xs]).mean(0), **TIGHT)
    # Reference 2: a manual pass in train mode with momentum=None over a copy with the averaged weights.
    ref = copy.deepcopy(final)
    for bn in (ref.bn0, ref.bn1):
        bn.reset_running_stats()
        bn.momentum = None
    ref.train()
    with torch.no_grad():
        for x in xs:
            ref(x)
    for name in ("bn0", "bn1"):
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(getattr(final, name), buf), getattr(getattr(ref, name), buf), **TIGHT)
    assert final.bn1.num_batches_tracked.item() == len(data)
    assert final.bn0.momentum == 0.1  # restored
    # bn1 saw hidden activations of the averaged weights, which differ from the model's: not the model's stats.
    assert not torch.allclose(final.bn1.running_mean, model.bn1.running_mean)
    # The averaged weights and modes are unchanged, the training model is untouched.
    assert_weights(final, averaged_params, rtol=0, atol=0)
    assert [m.training for m in final.modules()] == [False, False, True, False, False]
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, model_state[k]), k
    with pytest.raises(RuntimeError, match="finalize"):
        avg.update(len(data))


def test_update_bn_function_and_missing_loader_warning():
    torch.manual_seed(0)
    model = Net().double()
    data = bn_batches(3)
    update_bn(data, model, forward=lambda m, batch: m(batch[0] * 0 + 1))  # constant input: mean 1, var 0
    torch.testing.assert_close(model.bn0.running_mean, torch.ones(3, dtype=torch.float64), **TIGHT)
    torch.testing.assert_close(model.bn0.running_var, torch.zeros(3, dtype=torch.float64), **TIGHT)
    avg = SWA(model)
    avg.update(0)
    with pytest.warns(UserWarning, match="BatchNorm statistics"):
        avg.finalize()


def test_update_bn_failing_batch_restores_statistics():
    torch.manual_seed(0)
    model = Net().double()
    model(bn_batches(1)[0][0])  # non-trivial running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def batches():
        yield bn_batches(1)[0]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        update_bn(batches(), model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.bn0.momentum == model.bn1.momentum == 0.1 and model.training


# ------------------------------------------------------------------------------------------ with SAM


def test_swa_and_swad_over_sam_average_the_unperturbed_weights():
    """SAM restores w before its base step, so the averagers see the iterates
    x_{t+1} = x_t − η·A(x_t + ρ·Ax_t/‖Ax_t‖) (closed form on L = ½xᵀAx), never w + ε."""
    lr, rho, steps = 0.1, 0.05, 8
    model = Quadratic()
    opt = fm.SAM(torch.optim.SGD(model.parameters(), lr=lr), rho=rho)
    swa, ema = SWA(model, start=2), EMA(model, decay=0.5)
    swad = SWAD(model, n_start=2, n_end=2, tolerance=1.0)
    A, x = model.A, model.flat().detach().clone()
    iterates = []
    for t in range(steps):
        opt.step(model.closure())
        g = A @ x
        x = x - lr * A @ (x + rho * g / g.norm())
        torch.testing.assert_close(model.flat().detach(), x, rtol=0, atol=1e-12)
        iterates.append(x)
        for avg in (swa, ema, swad):
            avg.update(t)
        swad.report_validation(t, [3.0, 2.0, 1.0, 1.5, 1.2, 1.4, 1.6, 1.7][t])
    flat = lambda m: torch.cat([m.W.detach().flatten(), m.b.detach()])  # noqa: E731
    torch.testing.assert_close(flat(swa.finalize()), torch.stack(iterates[2:]).mean(0), **TIGHT)
    e = iterates[0]
    for it in iterates[1:]:
        e = 0.5 * e + 0.5 * it
    torch.testing.assert_close(flat(ema.finalize()), e, **TIGHT)
    # t_s = 2 (1.0 ≤ 1.5), threshold 1.0: every later loss exceeds it, so with N_e = 2 t_e = 3.
    assert swad.window == (2, 3)
    torch.testing.assert_close(flat(swad.finalize()), torch.stack(iterates[2:4]).mean(0), **TIGHT)


# ------------------------------------------------------------------------------------------ bad configuration


@pytest.mark.parametrize("cls, kwargs, name", [
    (SWA, dict(start=-1), "start"), (SWA, dict(every=0), "every"), (SWA, dict(start=1.5), "start"),
    (SWA, dict(use_buffers="yes"), "use_buffers"), (SWA, dict(device="nowhere"), "device"),
    (EMA, dict(decay=1.0), "decay"), (EMA, dict(decay=-0.1), "decay"), (EMA, dict(decay=float("nan")), "decay"),
    (EMA, dict(warmup=1), "warmup"), (EMA, dict(every=-2), "every"),
    (SWAD, dict(n_start=0), "n_start"), (SWAD, dict(n_end=0), "n_end"), (SWAD, dict(tolerance=0.9), "tolerance"),
    (SWAD, dict(tolerance=float("inf")), "tolerance"), (SWAD, dict(n_end=2.0), "n_end"),
])
def test_bad_configuration_raises_before_anything(cls, kwargs, name, monkeypatch):
    model = linear()
    state = copy.deepcopy(model.state_dict())
    copies = []
    monkeypatch.setattr(swa_utils, "deepcopy", lambda *a, **k: copies.append(1))  # how AveragedModel copies
    with pytest.raises(ValueError, match=f"Invalid {name}") as info:
        cls(model, **kwargs)
    monkeypatch.undo()
    assert "expected" in str(info.value)
    assert not copies
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_model_must_be_a_module():
    with pytest.raises(ValueError, match="Invalid model"):
        SWA(torch.zeros(3))
    with pytest.raises(ValueError, match="Invalid model"):
        SWAD(nn.ReLU())
