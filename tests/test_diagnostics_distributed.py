"""Diagnostics under torch.distributed (2 gloo ranks on the CPU): with a process group every loss,
gradient and Hessian-vector product is reduced over the ranks' data, so λ_max, the Hutchinson
trace, sharpness and landscape values on two half-batches equal one process on the whole batch;
``distributed=False`` gives each rank's own values, and per-batch diagnostics gather every rank's
batches in rank order."""

from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flatminima import diagnostics as dg
from helpers import spawn_ranks

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

WORLD, N = 2, 16
TIGHT = dict(rtol=1e-10, atol=1e-12)


def mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.8 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 4, generator=g, dtype=torch.float64), torch.randn(N, 2, generator=g, dtype=torch.float64)


def shard(b, rank: int):
    h = N // WORLD
    return tuple(t[rank * h:(rank + 1) * h] for t in b)


def halves(b):
    """A batch as a list of two batches (per-batch diagnostics)."""
    h = b[0].shape[0] // 2
    return [tuple(t[:h] for t in b), tuple(t[h:] for t in b)]


def mse(model, b):
    return F.mse_loss(model(b[0]), b[1])


def measures(model, data, **kw) -> dict:
    """Every quantity compared, on ``data`` (a rank's shard, or the whole batch in one process)."""
    eig = dg.top_eigenvalues(model, mse, data, k=2, tol=1e-12, bound="residual", **kw)
    power = dg.power_iteration(model, mse, data, tol=1e-10, max_iter=500, **kw)
    trace = dg.hessian_trace(model, mse, data, probes=6, min_probes=6, **kw)
    sharp = dg.worst_case_sharpness(model, mse, data, rho=0.1, steps=3, **kw)
    avg = dg.average_sharpness(model, mse, data, sigma=0.05, samples=3, **kw)
    land = dg.loss_landscape(model, mse, data, alphas=[-0.5, 0.0, 0.5], **kw)
    objective = dg.Objective(model, mse, data, **kw)
    v = [torch.ones_like(p) for p in objective.params]
    return {"eig": eig.values, "power": power.values, "trace_samples": trace.samples, "sharpness": sharp.sharpness,
            "sharp_path": sharp.path, "avg": avg.values, "landscape": land.loss,
            "hvp": torch.cat([t.flatten() for t in dg.hvp(objective, v)]),
            "grad": torch.cat([t.flatten() for t in objective.gradient()[1]]), "value": objective.value()}


def per_batch(model, data, **kw) -> dict:
    be = dg.batch_top_eigenvalues(model, mse, data, tol=1e-10, **kw)
    ms = dg.m_sharpness(model, mse, data, m=2, rho=0.1, steps=2, **kw)
    return {"batch_values": be.values, "batch_sizes": be.batch_sizes, "m_values": ms.values, "m": ms.sharpness}


def _tensors(x):
    """Results as tensors (the launcher's files are read with torch.load(weights_only=True))."""
    if isinstance(x, dict):
        return {k: _tensors(v) for k, v in x.items()}
    return torch.as_tensor(np.asarray(x)) if isinstance(x, (np.ndarray, np.generic, float)) else x


def _worker(rank: int, world: int, store: str, out: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        model, data = mlp(), shard(batch(), rank)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        results = {"reduced": measures(model, data), "local": measures(model, data, distributed=False),
                   "per_batch": per_batch(model, halves(data)),
                   "ddp": dg.top_eigenvalues(nn.parallel.DistributedDataParallel(model), mse, data, k=2, tol=1e-12,
                                             bound="residual").values,
                   "untouched": all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())}
        torch.save(_tensors(results), os.path.join(out, f"rank{rank}.pt"))
    except BaseException:
        Path(out, f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)  # do not wait for peers in destroy_process_group
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_ranks(_worker, tmp_path_factory.mktemp("ddp_diagnostics"), WORLD, [], 120.0)


def assert_same(got: dict, want: dict) -> None:
    for key, value in want.items():
        torch.testing.assert_close(torch.as_tensor(np.asarray(got[key])), torch.as_tensor(np.asarray(value)), **TIGHT,
                                   msg=lambda m, key=key: f"{key}: {m}")


def test_diagnostics_on_two_half_batches_equal_one_process_on_the_whole_batch(ranks):
    whole = measures(mlp(), batch())
    for r in ranks:
        assert_same(r["reduced"], whole)
        torch.testing.assert_close(torch.as_tensor(r["ddp"]), torch.as_tensor(whole["eig"]), **TIGHT)
        assert r["untouched"]
    # λ_max against the exact Hessian of the whole batch (float64 eigvalsh)
    model, b = mlp(), batch()
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in params]

    def flat_loss(x):
        chunks, i = [], 0
        for s in shapes:
            chunks.append(x[i:i + s.numel()].view(s))
            i += s.numel()
        return mse(lambda inp: torch.func.functional_call(model, dict(zip(names, chunks)), (inp,)), b)

    H = torch.autograd.functional.hessian(flat_loss, torch.cat([p.detach().flatten() for p in params]))
    top = torch.linalg.eigvalsh(H).flip(0)[:2].numpy()
    np.testing.assert_allclose(ranks[0]["reduced"]["eig"], top, rtol=1e-9)


def test_distributed_false_gives_each_ranks_own_values(ranks):
    for rank, r in enumerate(ranks):
        own = measures(mlp(), shard(batch(), rank), distributed=False)
        assert_same(r["local"], own)
    assert not np.allclose(ranks[0]["local"]["eig"], ranks[1]["local"]["eig"], rtol=1e-3)


def test_per_batch_diagnostics_gather_every_ranks_batches_in_rank_order(ranks):
    data = [b for rank in range(WORLD) for b in halves(shard(batch(), rank))]
    want = per_batch(mlp(), data)
    for r in ranks:
        assert_same(r["per_batch"], want)
    assert len(want["batch_values"]) == 2 * WORLD


def test_distributed_true_without_a_process_group_is_refused():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="Invalid distributed"):
        dg.top_eigenvalues(mlp(), mse, batch(), distributed=True)
    with pytest.raises(ValueError, match="Invalid distributed"):
        dg.worst_case_sharpness(mlp(), mse, batch(), distributed="yes")
