"""DDP semantics of the engine (DESIGN.md §4, §8.5): 2 processes on the gloo backend (CPU).

One launch runs every scenario on both ranks (each rank gets its half of every batch) and writes
the weights after each step to a file; the tests compare them with one process on the
concatenated batch (``sync_perturbation=True``, and methods that keep the clean gradient) or with
a hand computation of per-rank ε (``sync_perturbation=False``: ε_r from rank r's local clean
gradient, descent gradient = mean over ranks of ∇L_r(w + ε_r)). A child that fails or hangs fails
the test (its traceback is in the message); no process outlives the launch.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import flatminima as fm
from helpers import ChildFailed, count_allreduces, spawn_ranks

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

WORLD = 2
STEPS = 3
LR, RHO, MOMENTUM = 0.1, 0.05, 0.9
LAUNCH_TIMEOUT = 120.0  # seconds for the whole launch (normally a few seconds)
TIGHT = dict(rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Shared by the workers and the references





def mlp(dtype=torch.float64) -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def data(seed: int, dtype=torch.float64, n: int = 4 * WORLD):
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def shard(b, rank: int):
    x, y = b
    h = x.shape[0] // WORLD
    return x[rank * h:(rank + 1) * h], y[rank * h:(rank + 1) * h]


def mse(model, b):
    x, y = b
    return F.mse_loss(model(x), y)


def micro_batches(step: int, n: int, rank: int | None = None, dtype=torch.float64) -> list:
    """Micro-batch j of step t; a rank gets its half of each (the full one is the concatenation)."""
    full = [data(10 * step + j, dtype) for j in range(n)]
    return full if rank is None else [shard(b, rank) for b in full]


def make_method(name: str, params, sync: bool) -> fm.FlatOptimizer:
    base = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    if name == "sam":
        return fm.SAM(base, rho=RHO, sync_perturbation=sync)
    if name == "sam_inf":
        return fm.SAM(base, rho=RHO, norm="inf", sync_perturbation=sync)
    if name == "gasam_k1":
        return fm.GASAM(base, epsilon=RHO, steps=1, sync_perturbation=sync)
    if name == "random_search":
        return fm.RandomSearchSAM(base, rho=RHO, candidates=3, sync_perturbation=sync)
    if name in NEW_METHODS:
        return fm.create(name, base, rho=RHO, sync_perturbation=sync, **NEW_METHODS[name])
    raise ValueError(name)


# The methods added with the ascent-direction and post-step axes, with shared ε: the EMA state, GSAM's
# projection, WSAM's post-step update and GAM/C-Flat's four passes all see the global gradients.
NEW_METHODS = {"gsam": {}, "wsam": {}, "vasso": {"theta": 0.5}, "friendlysam": {"lmbda": 0.6}, "fishersam": {},
               "gam": {}, "cflat": {}}


# name: (method, sync_perturbation, accumulation, micro-batches per step)
SCENARIOS = {
    "sam_sync": ("sam", True, "last", 1),
    "sam_sync_last_2": ("sam", True, "last", 2),
    "sam_sync_full_2": ("sam", True, "full", 2),
    "gasam_sync": ("gasam_k1", True, "last", 1),
    "gasam_local": ("gasam_k1", False, "last", 1),  # keeps the clean gradient: its clean pass syncs anyway
    "sam_local": ("sam", False, "last", 1),
    "sam_local_full_2": ("sam", False, "full", 2),
    "sam_local_last_2": ("sam", False, "last", 2),
    # DDP's gradient_as_bucket_view=True: .grad is a view into the all-reduce buckets
    "sam_sync_bucket_view": ("sam", True, "last", 2),
    "sam_local_bucket_view": ("sam", False, "full", 2),
    "random_search_sync": ("random_search", True, "last", 1),
    **{f"{m}_sync": (m, True, "last", 2) for m in NEW_METHODS},
}
BUCKET_VIEW = {"sam_sync_bucket_view", "sam_local_bucket_view"}


# --------------------------------------------------------------------------------------------
# Worker side


def _run_scenario(name: str, rank: int) -> dict:
    method, sync, accumulation, n = SCENARIOS[name]
    model = nn.parallel.DistributedDataParallel(mlp(), gradient_as_bucket_view=name in BUCKET_VIEW)
    opt = make_method(method, model.parameters(), sync)
    step = fm.TrainStep(model, opt, mse, accumulation=accumulation)
    weights, losses = [], []
    for t in range(STEPS):
        result = step(micro_batches(t, n, rank))
        weights.append([p.detach().clone() for p in model.parameters()])
        losses.append(result.loss.clone())
    return {"weights": weights, "losses": losses, "step_count": opt.step_count}


def _run_fp16_skip(rank: int) -> dict:
    """Only rank 1's clean pass (step 0) gets an inf gradient entry. SAM with norm "inf" turns it into a
    finite ε (sign), and the clean pass does not sync (sync_perturbation=False), so rank 0 sees no
    inf at all: both ranks must still skip."""
    calls = [0]

    from helpers import InfGrad

    def loss_fn(model, b):
        loss = mse(model, b)
        if rank == 1 and calls[0] == 0:
            loss = loss + 0.0 * InfGrad.apply(next(model.parameters())).sum()
        calls[0] += 1
        return loss

    model = nn.parallel.DistributedDataParallel(mlp(torch.float32))
    opt = make_method("sam_inf", model.parameters(), sync=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    step = fm.TrainStep(model, opt, loss_fn, scaler=scaler)
    out = {"initial": [p.detach().clone() for p in model.parameters()]}
    for t in range(2):
        result = step(micro_batches(t, 1, rank, torch.float32))
        out[t] = {
            "skipped": result.skipped, "loss": result.loss.clone(), "scale": scaler.get_scale(),
            "weights": [p.detach().clone() for p in model.parameters()], "step_count": opt.step_count,
            "grads_finite": all(bool(torch.isfinite(p.grad).all()) for p in model.parameters()),
            "momentum": len(opt.base.state),
        }
    out["calls"] = calls[0]
    return out


def _run_bucket_view_check(rank: int) -> dict:
    """A method that keeps the clean gradient across passes is refused with bucket views (DDP would
    overwrite it in place), naming the fix; SAM is accepted."""
    model = nn.parallel.DistributedDataParallel(mlp(), gradient_as_bucket_view=True)
    try:
        fm.TrainStep(model, make_method("gasam_k1", model.parameters(), True), mse)
        message = None
    except ValueError as err:
        message = str(err)
    fm.TrainStep(model, make_method("sam", model.parameters(), True), mse)
    return {"message": message}


SYNC_COUNTS = {  # method, sync_perturbation -> all-reduces per step (2 micro-batches, "full")
    ("base", False): 1,            # the clean pass is the descent pass
    ("sam", False): 1,             # clean pass under no_sync, the descent pass syncs once
    ("sam", True): 2,              # the clean pass syncs too (global ε)
    ("gasam_k2", False): 3,        # the clean gradient enters the descent gradient: every pass syncs
    ("random_search", False): 1,   # forward-only clean pass and probes, one descent pass
}


def _run_sync_counts(rank: int) -> dict:
    """Count DDP bucket all-reduces (a comm hook) per step: the first micro-batch of a synced pass
    and every unsynced pass run under no_sync."""
    out = {}
    for method, sync in SYNC_COUNTS:
        model = nn.parallel.DistributedDataParallel(mlp())
        count = count_allreduces(model)
        base = torch.optim.SGD(model.parameters(), lr=LR)
        opt = {"base": lambda: fm.Base(base), "sam": lambda: fm.SAM(base, rho=RHO, sync_perturbation=sync),
               "gasam_k2": lambda: fm.GASAM(base, epsilon=RHO, steps=2, sync_perturbation=sync),
               "random_search": lambda: fm.RandomSearchSAM(base, rho=RHO, candidates=2)}[method]()
        step = fm.TrainStep(model, opt, mse, accumulation="full")
        counts = []
        for t in range(2):
            count[0] = 0
            step(micro_batches(t, 2, rank))
            counts.append(count[0])
        out[(method, sync)] = counts
    return out


def _run_fail(rank: int) -> dict:
    """Rank 1 dies before a collective that rank 0 is blocked in."""
    if rank == 1:
        raise RuntimeError("deliberate failure on rank 1")
    dist.all_reduce(torch.ones(1))
    return {}


RUNNERS = {"fp16_skip": _run_fp16_skip, "bucket_view_check": _run_bucket_view_check, "sync_counts": _run_sync_counts,
           "fail": _run_fail}


def _worker(rank: int, world: int, store: str, out: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        results = {}
        for name in names:
            results[name] = RUNNERS[name](rank) if name in RUNNERS else _run_scenario(name, rank)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    except BaseException:
        Path(out, f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)  # do not wait for peers in destroy_process_group
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Launcher


def launch(tmp: Path, names: list[str], timeout: float = LAUNCH_TIMEOUT) -> list[dict]:
    """Run ``names`` on WORLD spawned ranks; fail (not hang) if a rank fails or the launch times out."""
    return spawn_ranks(_worker, tmp, WORLD, names, timeout)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("ddp"), list(SCENARIOS) + ["fp16_skip", "bucket_view_check", "sync_counts"])


# --------------------------------------------------------------------------------------------
# References


def single_process(name: str) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """The same method in one process on the concatenated batch."""
    method, sync, accumulation, n = SCENARIOS[name]
    model = mlp()
    opt = make_method(method, model.parameters(), sync)
    step = fm.TrainStep(model, opt, mse, accumulation=accumulation)
    weights, losses = [], []
    for t in range(STEPS):
        losses.append(step(micro_batches(t, n)).loss)
        weights.append([p.detach().clone() for p in model.parameters()])
    return weights, losses


def f_grad(model, params: dict, b) -> dict:
    x, y = b
    return torch.func.grad(lambda p: F.mse_loss(functional_call(model, p, (x,)), y))(params)


def mean_dicts(ds: list[dict]) -> dict:
    return {k: sum(d[k] for d in ds) / len(ds) for k in ds[0]}


def per_rank_epsilon(name: str) -> list[list[torch.Tensor]]:
    """SAM with per-rank ε by hand: ε_r = ρ·g_r/‖g_r‖ with g_r rank r's mean clean gradient over its
    micro-batches; d = mean_r of the perturbed gradient of rank r at w + ε_r (its last micro-batch,
    or the mean over all of them for "full"); SGD with momentum."""
    method, sync, accumulation, n = SCENARIOS[name]
    assert method == "sam" and not sync
    model = mlp()
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    buf, out = None, []
    for t in range(STEPS):
        per_rank = []
        for r in range(WORLD):
            mbs = micro_batches(t, n, r)
            g = mean_dicts([f_grad(model, w, b) for b in mbs])
            norm = torch.sqrt(sum((v * v).sum() for v in g.values()))
            at = {k: w[k] + RHO * g[k] / norm for k in w}
            used = mbs[-1:] if accumulation == "last" else mbs
            per_rank.append(mean_dicts([f_grad(model, at, b) for b in used]))
        d = mean_dicts(per_rank)
        buf = d if buf is None else {k: MOMENTUM * buf[k] + d[k] for k in d}
        w = {k: w[k] - LR * buf[k] for k in w}
        out.append(list(w.values()))
    return out


# --------------------------------------------------------------------------------------------
# Tests


def _ranks_agree(ranks, name):
    for a, b in zip(ranks[0][name]["weights"], ranks[1][name]["weights"]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)  # DDP hands both ranks the same descent gradient


@pytest.mark.parametrize("name", ["sam_sync", "sam_sync_last_2", "sam_sync_full_2", "gasam_sync", "gasam_local",
                                  "sam_sync_bucket_view", *(f"{m}_sync" for m in NEW_METHODS)])
def test_synced_perturbation_matches_one_process_on_the_concatenated_batch(ranks, name):
    _ranks_agree(ranks, name)
    weights, losses = single_process(name)
    for t in range(STEPS):
        torch.testing.assert_close(ranks[0][name]["weights"][t], weights[t], **TIGHT)
        # each rank returns its local clean loss; their mean is the global one
        torch.testing.assert_close((ranks[0][name]["losses"][t] + ranks[1][name]["losses"][t]) / 2, losses[t], **TIGHT)
    assert ranks[0][name]["step_count"] == ranks[1][name]["step_count"] == STEPS


@pytest.mark.parametrize("name", ["sam_local", "sam_local_last_2", "sam_local_full_2", "sam_local_bucket_view"])
def test_per_rank_perturbation_matches_the_hand_computation(ranks, name):
    _ranks_agree(ranks, name)
    expected = per_rank_epsilon(name)
    for t in range(STEPS):
        torch.testing.assert_close(ranks[0][name]["weights"][t], expected[t], **TIGHT)
    # ...and it is not the globally shared ε (the test can tell them apart).
    synced = {"sam_local": "sam_sync", "sam_local_last_2": "sam_sync_last_2", "sam_local_full_2": "sam_sync_full_2",
              "sam_local_bucket_view": "sam_sync_full_2"}[name]
    diff = max((a - b).abs().max().item()
               for a, b in zip(ranks[0][name]["weights"][-1], ranks[0][synced]["weights"][-1]))
    assert diff > 1e-6


def test_synced_forward_only_pass_averages_its_loss_over_ranks(ranks):
    """RandomSearchSAM's clean pass is forward-only and, with sync_perturbation=True, synced: each
    rank gets the global clean loss (the one its candidates are compared with)."""
    name = "random_search_sync"
    _ranks_agree(ranks, name)
    model = mlp()
    w = [p.detach().clone() for p in model.parameters()]
    for t in range(STEPS):
        assert torch.equal(ranks[0][name]["losses"][t], ranks[1][name]["losses"][t])
        with torch.no_grad():
            for p, v in zip(model.parameters(), w):
                p.copy_(v)
            global_loss = mse(model, micro_batches(t, 1)[0])  # the concatenated batch at the rank's w
        torch.testing.assert_close(ranks[0][name]["losses"][t], global_loss, **TIGHT)
        w = ranks[0][name]["weights"][t]


def test_random_search_with_synced_perturbation_matches_one_process(ranks):
    name = "random_search_sync"
    weights, _ = single_process(name)
    for t in range(STEPS):
        torch.testing.assert_close(ranks[0][name]["weights"][t], weights[t], **TIGHT)


def test_fp16_inf_on_one_rank_skips_the_step_on_every_rank(ranks):
    r0, r1 = ranks[0]["fp16_skip"], ranks[1]["fp16_skip"]
    for r in (r0, r1):
        assert r[0]["skipped"] is True
        for x, y in zip(r[0]["weights"], r["initial"]):
            assert torch.equal(x, y)
        assert r[0]["step_count"] == 0 and r[0]["momentum"] == 0  # no base optimizer state yet
        assert r[0]["scale"] == 2.0**7
        assert r["calls"] == 4  # clean + perturbed, two steps
    # Rank 0's own gradients were finite throughout: its skip came from rank 1.
    assert r0[0]["grads_finite"] and r1[0]["grads_finite"]
    assert torch.isfinite(r0[0]["loss"]) and torch.isfinite(r1[0]["loss"])
    # The next step is taken on both ranks, identically.
    for r in (r0, r1):
        assert r[1]["skipped"] is False and r[1]["step_count"] == 1 and r[1]["scale"] == 2.0**7
    for x, y, w in zip(r0[1]["weights"], r1[1]["weights"], r0["initial"]):
        assert torch.equal(x, y) and not torch.equal(x, w)


def test_passes_that_only_feed_a_per_rank_perturbation_do_not_sync(ranks):
    for r in ranks:
        counts = r["sync_counts"]
        for key, expected in SYNC_COUNTS.items():
            assert counts[key] == [expected] * 2, (key, counts[key])  # one bucket (a tiny model)


def test_gradient_as_bucket_view_is_refused_where_the_clean_gradient_is_kept(ranks):
    for r in ranks:
        message = r["bucket_view_check"]["message"]
        assert message is not None and "gradient_as_bucket_view=False" in message


def test_a_failing_rank_fails_the_launch_instead_of_hanging(tmp_path):
    start = time.monotonic()
    with pytest.raises(ChildFailed, match="deliberate failure on rank 1"):
        launch(tmp_path, ["fail"], timeout=60)
    assert time.monotonic() - start < 45  # rank 0, blocked in all_reduce, was killed
