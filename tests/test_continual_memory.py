"""Replay and A-GEM against hand computations: the reservoir's inclusion probabilities (a chi-square
bound that a biased reservoir fails), its exact content for fixed seeds against a hand-run algorithm R,
each step's batch, A-GEM's projection against eq. 11 in both cases, its memory and its side effects,
and SAM steps with the projection against a hand step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatminima as fm
from flatminima.continual.memory import AGEM, AGEM_STREAM, REPLAY_STREAM, SAMPLE_STREAM, Replay, Reservoir
from flatminima.continual.strategy import BASELINES, TaskContext, make_baselines
from flatminima.core.schedules import derive_seed
from flatminima.engine import TrainStep

D, C = torch.float64, 3


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def stream(n, batch):
    x = torch.arange(n, dtype=D)[:, None]
    return [(x[i:i + batch], torch.arange(n)[i:i + batch]) for i in range(0, n, batch)]


def hand_reservoir(size, seed, batches, off_by_one=False):
    """Algorithm R example by example, with the documented draws: one float64 uniform per example."""
    gen = torch.Generator().manual_seed(seed)
    slots, n = [None] * size, 0
    for _, y in batches:
        u = torch.rand(len(y), dtype=D, generator=gen).tolist()
        for item, uk in zip(y.tolist(), u):
            if n < size:
                slots[n] = item
            else:
                j = int(uk * n) if off_by_one else int(uk * (n + 1))
                if j < size:
                    slots[j] = item
            n += 1
    return slots


def test_registered_and_built_by_strategy():
    assert {"replay", "agem"} <= set(BASELINES.names())
    replay, agem = make_baselines("finetune+replay+agem", {"replay": {"size": 7}, "agem": {"per_task": 3}},
                                  model=nn.Linear(1, 1), seed=2)
    assert isinstance(replay, Replay) and replay.memory.size == 7
    assert isinstance(agem, AGEM) and agem.per_task == 3 and agem.seed == 2
    assert replay.has_batch and agem.has_projection and not replay.has_penalty


@pytest.mark.parametrize("size, batch", [(3, 4), (5, 1), (4, 7)])
def test_reservoir_content_matches_a_hand_run_algorithm_r(size, batch):
    for seed in range(5):
        res = Reservoir(size, seed)
        batches = stream(30, batch)
        for x, y in batches:
            res.add(x, y)
        x, y = res.content()
        assert y.tolist() == hand_reservoir(size, seed, batches)
        assert torch.equal(x[:, 0], y.to(D)) and res.seen == 30 and res.filled == size


def chi_square(counts, runs, p):
    return float((((counts - runs * p) ** 2) / (runs * p * (1 - p))).sum())


def test_reservoir_keeps_every_example_with_probability_size_over_n():
    """N = 20 items, size 5, batches of 4, 2000 seeds: each count is Binomial(2000, 1/4), the statistic
    has mean 20 and is near χ²(19); 70 is beyond its 1 − 1e-6 quantile (63.7). The off-by-one
    reservoir (j uniform on 0…n−1) scores ~130 on the same seeds: the bound can fail."""
    runs, n, size = 2000, 20, 5
    batches = stream(n, 4)
    counts, wrong = torch.zeros(n), torch.zeros(n)
    for seed in range(runs):
        res = Reservoir(size, seed)
        for x, y in batches:
            res.add(x, y)
        counts[res.content()[1]] += 1
        wrong[hand_reservoir(size, seed, batches, off_by_one=True)] += 1
    assert counts.sum() == runs * size
    assert chi_square(counts, runs, size / n) < 70
    assert chi_square(wrong, runs, size / n) > 70


def test_replay_extends_with_the_memory_before_the_batch():
    replay = Replay(size=6, batch_size=3, seed=4)
    batches = stream(20, 4)
    sampler = torch.Generator().manual_seed(derive_seed(4, SAMPLE_STREAM))
    mirror = Reservoir(6, derive_seed(4, REPLAY_STREAM))
    first = replay.extend_batch(batches[0])
    assert first is batches[0]  # an empty memory adds nothing
    mirror.add(*batches[0])
    for batch in batches[1:]:
        before = mirror.content()[1].clone()
        x, y = replay.extend_batch(batch)
        idx = torch.randperm(len(before), generator=sampler)[:3]
        assert y[:4].tolist() == batch[1].tolist() and y[4:].tolist() == before[idx].tolist()
        assert torch.equal(x[:, 0], y.to(D)) and len(set(y[4:].tolist())) == 3
        mirror.add(*batch)
        assert replay.memory.content()[1].tolist() == mirror.content()[1].tolist()
    assert replay.state() == {"memory": 6, "seen": 20}


def test_replay_default_batch_size_and_dict_inputs():
    replay = Replay(size=3)
    ids = torch.arange(12).reshape(6, 2)
    batches = [({"input_ids": ids[i:i + 2], "attention_mask": torch.ones(2, 2, dtype=torch.long)},
                torch.arange(6)[i:i + 2]) for i in range(0, 6, 2)]
    replay.extend_batch(batches[0])
    x, y = replay.extend_batch(batches[1])  # memory holds 2 < |B| = 2: both
    assert len(y) == 4 and sorted(y[2:].tolist()) == [0, 1]
    assert torch.equal(x["input_ids"], ids[y]) and x["attention_mask"].shape == (4, 2)
    x, y = replay.extend_batch(batches[2])
    assert len(y) == 4 and torch.equal(x["input_ids"], ids[y])
    with pytest.raises(ValueError, match="Invalid batch"):
        replay.extend_batch(({"input_ids": ids[:2, :1], "attention_mask": torch.ones(2, 1, dtype=torch.long)},
                             torch.arange(2)))


@pytest.mark.parametrize("cls, kwargs, word", [(Replay, {"size": 0}, "size"), (Replay, {"batch_size": 0}, "batch_size"),
                                               (Replay, {"seed": -1}, "seed"), (AGEM, {"per_task": 0}, "per_task"),
                                               (AGEM, {"batch_size": 1.5}, "batch_size"),
                                               (AGEM, {"n_batches": 0}, "n_batches"), (AGEM, {"seed": True}, "seed")])
def test_options_are_checked(cls, kwargs, word):
    with pytest.raises(ValueError, match=f"Invalid {word}"):
        cls(**kwargs)


# -------------------------------------------------------------------------------------------- A-GEM

def data(seed, n=10, dim=2, classes=(0, 1, 2)):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
    return torch.randn(n, dim, generator=g, dtype=D), y


def context(model, x, y, index=0, batch=4):
    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]
    return TaskContext(index=index, model=model, loss_fn=ce, memory_loss_fn=ce,
                       batches=lambda n: iter(batches if n is None else batches[:n]),
                       parameters=list(model.parameters()), classes=[0, 1, 2], seen_classes=[0, 1, 2], seed=0,
                       device=torch.device("cpu"))


def hand_gradient(model, x, y):
    """∇ of the mean cross-entropy of softmax regression: ((p − e_y)xᵀ, p − e_y) averaged."""
    with torch.no_grad():
        r = torch.softmax(x @ model.weight.T + model.bias, 1) - F.one_hot(y, C).to(D)
    return [r.T @ x / len(y), r.mean(0)]


def agem_with_memory(per_task=4, seed=1):
    torch.manual_seed(0)
    model = nn.Linear(2, C).to(D)
    agem = AGEM(per_task=per_task, batch_size=2 * per_task, seed=seed)
    xa, ya = data(1, classes=(0, 1))
    xb, yb = data(2, classes=(2,))
    agem.start_task(context(model, xa, ya))
    agem.end_task(context(model, xa, ya))
    agem.start_task(context(model, xb, yb, index=1))
    return model, agem, xa, ya


def test_agem_memory_is_a_seeded_uniform_sample_of_the_task():
    model, agem, xa, ya = agem_with_memory()
    mirror = Reservoir(4, derive_seed(1, AGEM_STREAM, 0))
    for i in range(0, 10, 4):
        mirror.add(xa[i:i + 4], ya[i:i + 4])
    mx, my = mirror.content()
    assert torch.equal(agem.x, mx) and torch.equal(agem.y, my) and agem.state() == {"memory": 4, "tasks": 1}
    xb, yb = data(2, classes=(2,))
    agem.end_task(context(model, xb, yb, index=1))
    assert len(agem.y) == 8 and (agem.y[4:] == 2).all() and agem.state()["tasks"] == 2


@pytest.mark.parametrize("conflict", [True, False])
def test_agem_projection_matches_eq_11(conflict):
    model, agem, _, _ = agem_with_memory()
    ref = hand_gradient(model, agem.x, agem.y)  # batch_size covers the whole memory: order is irrelevant
    other = [torch.randn(t.shape, generator=torch.Generator().manual_seed(3), dtype=D) for t in ref]
    dot = lambda u, v: sum((a * b).sum() for a, b in zip(u, v))  # noqa: E731
    # g = sign·g_ref + (component of `other` orthogonal to g_ref)
    coef = dot(other, ref) / dot(ref, ref)
    orth = [o - coef * r for o, r in zip(other, ref)]
    sign = -1.0 if conflict else 0.5
    g = [sign * r + o for r, o in zip(ref, orth)]
    for p, t in zip(model.parameters(), g):
        p.grad = t.clone()
    agem.project(model)
    got = [p.grad for p in model.parameters()]
    if conflict:
        want = [t - (dot(g, ref) / dot(ref, ref)) * r for t, r in zip(g, ref)]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        for a, b in zip(got, orth):  # eq. 11 leaves the orthogonal part
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    else:
        assert all(torch.equal(a, b) for a, b in zip(got, g))
    assert dot(got, ref) >= -1e-12


def test_agem_projection_without_memory_or_gradients_does_nothing():
    model = nn.Linear(2, C).to(D)
    agem = AGEM()
    model.weight.grad = torch.ones_like(model.weight)
    agem.project(model)  # no memory yet
    assert torch.equal(model.weight.grad, torch.ones_like(model.weight))
    model, agem, _, _ = agem_with_memory()
    agem.project(model)  # no .grad anywhere
    assert all(p.grad is None for p in model.parameters())


def test_agem_reference_pass_leaves_rng_and_running_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Dropout(0.3), nn.Linear(4, C)).to(D)
    agem = AGEM(per_task=6, batch_size=4)
    x, y = data(1)
    agem.start_task(context(model, x, y))
    agem.end_task(context(model, x, y))
    agem.start_task(context(model, x, y, index=1))
    ce(model, (x, y)).backward()
    stats = [b.clone() for b in (model[1].running_mean, model[1].running_var, model[1].num_batches_tracked)]
    rng = torch.get_rng_state()
    agem.project(model)
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(torch.equal(a, b) for a, b in zip(stats, (model[1].running_mean, model[1].running_var,
                                                         model[1].num_batches_tracked)))


def test_sam_step_with_projection_matches_a_hand_step():
    """TrainStep.passes (descent gradient at w in .grad), the projection at w, then the SGD update."""
    model, agem, _, _ = agem_with_memory()
    x, y = data(5, classes=(2,))
    params = list(model.parameters())
    w0 = [p.detach().clone() for p in params]
    g = hand_gradient(model, x, y)
    norm = torch.sqrt(sum((t ** 2).sum() for t in g))
    probe = nn.Linear(2, C).to(D)
    with torch.no_grad():
        for q, w, t in zip(probe.parameters(), w0, g):
            q.copy_(w + 0.05 * t / norm)
    g_sam = hand_gradient(probe, x, y)  # ∇L(w + ε), ε = ρ·g/‖g‖
    opt = fm.methods.create("sam", torch.optim.SGD(params, lr=0.1), rho=0.05)
    step = TrainStep(model, opt, ce)
    step.passes([(x, y)])
    for p, t in zip(params, g_sam):
        torch.testing.assert_close(p.grad, t, rtol=1e-12, atol=1e-14)
    agem.project(model)
    ref = hand_gradient(model, agem.x, agem.y)
    along = sum((a * b).sum() for a, b in zip(g_sam, ref))
    assert along < 0  # the data of task 1 conflicts with the memory of task 0: the projection acts
    coef = float(along) / float(sum((r ** 2).sum() for r in ref))
    opt.step()
    for p, w, t, r in zip(params, w0, g_sam, ref):
        torch.testing.assert_close(p.detach(), w - 0.1 * (t - coef * r), rtol=1e-12, atol=1e-14)


def test_descent_hook_projects_inside_the_step():
    model, agem, _, _ = agem_with_memory()
    x, y = data(5)
    twin, twin_agem, _, _ = agem_with_memory()
    opt = fm.methods.create("sam", torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    TrainStep(model, opt, ce, descent_hook=agem.project)([(x, y)])
    opt2 = fm.methods.create("sam", torch.optim.SGD(twin.parameters(), lr=0.1), rho=0.05)
    step = TrainStep(twin, opt2, ce)
    step.passes([(x, y)])
    twin_agem.project(twin)
    opt2.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
