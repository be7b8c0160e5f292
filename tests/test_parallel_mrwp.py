"""Parallel m-RWP (DESIGN.md §4): k noisy and m clean ranks, losses weighted λ·W/k and (1 − λ)·W/m,
one all-reduce per step. World sizes 2 and 3 (odd sizes work too) on gloo, each rank on its own
shard of every batch, compared with a one-process hand computation

    g = λ·mean_{noisy r} ∇L_r(w + ε_r) + (1 − λ)·mean_{clean r} ∇L_r(w),

ε_r regenerated from the method's seeding (seed, step, rank, tensor). The launcher is the one of
test_distributed.py: a failing or hanging child fails the test with its traceback.
"""

from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import flatminima as fm
from helpers import count_allreduces, spawn_ranks
from flatminima.core.schedules import derive_seed

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

STEPS = 3
LR, SIGMA, MOMENTUM, SEED = 0.1, 0.2, 0.9, 5
LAUNCH_TIMEOUT = 120.0
TIGHT = dict(rtol=1e-12, atol=1e-12)
ROWS = 3  # rows of every batch per rank


def mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def micro_batches(step: int, n: int, world: int, rank: int) -> list:
    """Micro-batch j of step t, rank r's shard of it."""
    out = []
    for j in range(n):
        g = torch.Generator().manual_seed(100 + 10 * step + j)
        x = torch.randn(ROWS * world, 4, generator=g, dtype=torch.float64)
        y = torch.randn(ROWS * world, 2, generator=g, dtype=torch.float64)
        out.append((x[rank * ROWS:(rank + 1) * ROWS], y[rank * ROWS:(rank + 1) * ROWS]))
    return out


def mse(model, b):
    x, y = b
    return F.mse_loss(model(x), y)


def weighted_closure(model, batch):
    """The closure form of parallel m-RWP: it applies the pass's loss weight itself."""
    def closure(loss_weight=1.0):
        loss = mse(model, batch)
        (loss * loss_weight).backward()
        return loss.detach()

    return closure


def make(params, lam: float, noisy_ranks=None) -> fm.MRWP:
    base = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    return fm.MRWP(base, sigma=SIGMA, noisy_weight=lam, parallel=True, noisy_ranks=noisy_ranks, seed=SEED)


# name: (world, λ, noisy_ranks, micro-batches per step, form)
SCENARIOS = {
    "w2": (2, 0.7, None, 1, "engine"),          # k = 1: weights 1.4 and 0.6
    "w2_accum": (2, 0.7, None, 2, "engine"),
    "w2_closure": (2, 0.7, None, 1, "closure"),
    "w3": (3, 0.5, None, 1, "engine"),          # k = round(1.5) = 2: weights 0.75 and 1.5
    "w3_k1_accum": (3, 0.3, 1, 2, "engine"),    # k = 1: weights 0.9 and 1.05
}


# --------------------------------------------------------------------------------------------
# Worker side


def _run_scenario(name: str, rank: int) -> dict:
    world, lam, k, n, form = SCENARIOS[name]
    model = nn.parallel.DistributedDataParallel(mlp())
    opt = make(model.parameters(), lam, k)
    step = fm.TrainStep(model, opt, mse)
    rng = torch.get_rng_state()
    weights, losses = [], []
    for t in range(STEPS):
        mbs = micro_batches(t, n, world, rank)
        if form == "engine":
            loss = step(mbs).loss
        else:
            loss = opt.step(weighted_closure(model, mbs[0]))
        weights.append([p.detach().clone() for p in model.parameters()])
        losses.append(loss.clone())
    return {"weights": weights, "losses": losses, "step_count": opt.step_count,
            "rng_untouched": torch.equal(rng, torch.get_rng_state())}


def _run_resume(rank: int) -> dict:
    """Two steps, a state_dict, a fresh model and optimizer, the third step: as the uninterrupted run."""
    world = dist.get_world_size()
    model = nn.parallel.DistributedDataParallel(mlp())
    opt = make(model.parameters(), 0.7)
    for t in range(2):
        fm.TrainStep(model, opt, mse)(micro_batches(t, 1, world, rank))
    state = opt.state_dict()
    weights = [p.detach().clone() for p in model.parameters()]
    fresh = mlp()
    with torch.no_grad():
        for p, w in zip(fresh.parameters(), weights):
            p.copy_(w)
    model2 = nn.parallel.DistributedDataParallel(fresh)
    opt2 = make(model2.parameters(), 0.7)
    opt2.load_state_dict(state)
    fm.TrainStep(model2, opt2, mse)(micro_batches(2, 1, world, rank))
    return {"weights": [p.detach().clone() for p in model2.parameters()], "step_count": opt2.step_count}


def _run_sync_counts(rank: int) -> dict:
    """DDP bucket all-reduces per step (a comm hook): parallel m-RWP against plain SGD, 1 and 2
    micro-batches."""
    world = dist.get_world_size()
    out = {}
    for method in ("sgd", "mrwp"):
        for n in (1, 2):
            model = nn.parallel.DistributedDataParallel(mlp())
            count = count_allreduces(model)
            base = torch.optim.SGD(model.parameters(), lr=LR)
            opt = make(model.parameters(), 0.5) if method == "mrwp" else base
            step = fm.TrainStep(model, opt, mse)
            counts = []
            for t in range(2):
                count[0] = 0
                step(micro_batches(t, n, world, rank))
                counts.append(count[0])
            out[(method, n)] = counts
    return out


def _run_out_of_range(rank: int) -> dict:
    """noisy_ranks = W is refused at construction (the group exists) and, if the group is created
    after the optimizer, at the first step, before anything moves."""
    world = dist.get_world_size()
    model = nn.parallel.DistributedDataParallel(mlp())
    before = [p.detach().clone() for p in model.parameters()]
    messages = []
    try:
        make(model.parameters(), 0.5, noisy_ranks=world)
    except ValueError as err:
        messages.append(str(err))
    opt = make(model.parameters(), 0.5)
    opt.perturbation.noisy_ranks = world  # as if built for a larger world
    try:
        fm.TrainStep(model, opt, mse)(micro_batches(0, 1, world, rank))
    except ValueError as err:
        messages.append(str(err))
    untouched = (all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
                 and all(p.grad is None for p in model.parameters()) and not opt.base.state
                 and opt.step_count == 0)
    return {"messages": messages, "untouched": untouched}


RUNNERS = {"resume": _run_resume, "sync_counts": _run_sync_counts, "out_of_range": _run_out_of_range}


def _worker(rank: int, world: int, store: str, out: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        results = {name: RUNNERS[name](rank) if name in RUNNERS else _run_scenario(name, rank) for name in names}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    except BaseException:
        Path(out, f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)  # do not wait for peers in destroy_process_group
    dist.destroy_process_group()


def launch(tmp: Path, world: int, names: list[str], timeout: float = LAUNCH_TIMEOUT) -> list[dict]:
    """Run ``names`` on ``world`` spawned ranks; fail (not hang) if a rank fails or the launch times out."""
    return spawn_ranks(_worker, tmp, world, names, timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for world in (2, 3):
        names = [n for n, s in SCENARIOS.items() if s[0] == world] + ["sync_counts", "out_of_range"]
        names += ["resume"] if world == 2 else []
        out[world] = launch(tmp_path_factory.mktemp(f"world{world}"), world, names)
    return out


# --------------------------------------------------------------------------------------------
# The hand computation


def f_grad(model, params: dict, b) -> dict:
    x, y = b
    return torch.func.grad(lambda p: F.mse_loss(functional_call(model, p, (x,)), y))(params)


def mean_dicts(ds: list[dict]) -> dict:
    return {k: sum(d[k] for d in ds) / len(ds) for k in ds[0]}


def epsilon(w: dict, step: int, rank: int) -> dict:
    """σ·Z ⊙ S, filter scale (rows of a matrix, a vector's own norm), Z from (seed, step, rank, tensor)."""
    out = {}
    for i, (k, v) in enumerate(w.items()):
        g = torch.Generator().manual_seed(derive_seed(SEED, step, rank, i, 0))
        z = torch.randn(v.shape, generator=g, dtype=v.dtype)
        s = v.norm(dim=1, keepdim=True) if v.dim() == 2 else v.norm()
        out[k] = SIGMA * z * s
    return out


def by_hand(world: int, lam: float, k, n: int, _form=None) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Weights after each step, and each rank's loss (its own, unweighted, at its point)."""
    k = k or min(max(1, int(lam * world + 0.5)), world - 1)
    noisy = set(range(world - k, world))
    model = mlp()
    w = {key: v.detach().clone() for key, v in model.named_parameters()}
    buf, weights, losses = None, [], []
    for t in range(STEPS):
        grads, step_losses = {True: [], False: []}, []
        for r in range(world):
            mbs = micro_batches(t, n, world, r)
            at = {key: w[key] + e for key, e in epsilon(w, t, r).items()} if r in noisy else w
            grads[r in noisy].append(mean_dicts([f_grad(model, at, b) for b in mbs]))
            x_y = [functional_call(model, at, (b[0],)) for b in mbs]
            step_losses.append(sum(F.mse_loss(o, b[1]) for o, b in zip(x_y, mbs)).detach() / n)
        g_noisy, g_clean = mean_dicts(grads[True]), mean_dicts(grads[False])
        d = {key: lam * g_noisy[key] + (1 - lam) * g_clean[key] for key in w}
        buf = d if buf is None else {key: MOMENTUM * buf[key] + d[key] for key in d}
        w = {key: w[key] - LR * buf[key] for key in w}
        weights.append(list(w.values()))
        losses.append(step_losses)
    return weights, losses


# --------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_rank_matches_the_hand_computation(runs, name):
    world = SCENARIOS[name][0]
    ranks = runs[world]
    weights, losses = by_hand(*SCENARIOS[name])
    for t in range(STEPS):
        for r in range(world):
            assert all(torch.equal(a, b) for a, b in zip(ranks[r][name]["weights"][t], ranks[0][name]["weights"][t]))
            torch.testing.assert_close(ranks[r][name]["losses"][t], losses[t][r], **TIGHT)
        torch.testing.assert_close(ranks[0][name]["weights"][t], weights[t], **TIGHT)
    for r in range(world):
        assert ranks[r][name]["step_count"] == STEPS and ranks[r][name]["rng_untouched"]


def test_the_hand_computation_tells_the_mix_apart():
    """Sanity of the reference: with λ = 0.7 the mix is neither plain SGD nor the noisy gradient alone."""
    a, _ = by_hand(*SCENARIOS["w2"])
    for lam in (0.0, 1.0):
        b, _ = by_hand(2, lam, None, 1)
        assert max((x - y).abs().max().item() for x, y in zip(a[-1], b[-1])) > 1e-4


@pytest.mark.parametrize("world", [2, 3])
def test_one_all_reduce_per_step_like_plain_sgd(runs, world):
    for r in runs[world]:
        counts = r["sync_counts"]
        for n in (1, 2):
            assert counts[("mrwp", n)] == counts[("sgd", n)] == [1, 1], counts  # one bucket (a tiny model)


def test_resume_from_state_dict_is_bit_identical(runs):
    for r in runs[2]:
        assert r["resume"]["step_count"] == 3
        assert all(torch.equal(a, b) for a, b in zip(r["resume"]["weights"], r["w2"]["weights"][2]))


@pytest.mark.parametrize("world", [2, 3])
def test_noisy_ranks_out_of_range_touches_nothing(runs, world):
    for r in runs[world]:
        out = r["out_of_range"]
        assert len(out["messages"]) == 2 and out["untouched"]
        for message in out["messages"]:
            assert "noisy_ranks" in message and f"[1, {world - 1}]" in message


def test_without_a_process_group_nothing_moves():
    assert not dist.is_initialized()
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = make(model.parameters(), 0.5)
    batch = micro_batches(0, 1, 1, 0)
    with pytest.raises(RuntimeError, match=r"parallel=True.*init_process_group"):
        fm.TrainStep(model, opt, mse)(batch)

    with pytest.raises(RuntimeError, match="init_process_group"):
        opt.step(weighted_closure(model, batch[0]))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters()) and not opt.base.state and opt.step_count == 0


def test_forms_that_cannot_weigh_the_loss_are_refused():
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = make(model.parameters(), 0.5)
    batch = micro_batches(0, 1, 1, 0)[0]
    with pytest.raises(RuntimeError, match="TrainStep"):
        opt.step(lambda: mse(model, batch))  # a closure without loss_weight
    mse(model, batch).backward()
    with pytest.raises(RuntimeError, match="TrainStep"):
        opt.step()  # the explicit form
    with pytest.raises(RuntimeError, match="TrainStep"), opt.perturbed():
        pass
    with pytest.raises(RuntimeError, match="TrainStep"):
        opt.perturbations()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not opt.base.state and opt.step_count == 0


@pytest.mark.parametrize("hp, arg", [({"noisy_ranks": 0}, "noisy_ranks"), ({"noisy_ranks": True}, "noisy_ranks"),
                                     ({"noisy_ranks": 1.0}, "noisy_ranks"), ({"parallel": 1}, "parallel"),
                                     ({"parallel": False, "noisy_ranks": 1}, "noisy_ranks"),
                                     ({"different_batches": True}, "parallel")])
def test_bad_arguments_raise_and_touch_nothing(hp, arg):
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=LR)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    with pytest.raises(ValueError, match=arg):
        fm.create("mrwp", base, **{"parallel": True, **hp})
    assert [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups] == groups
