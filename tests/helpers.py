"""Shared fixtures for the method tests: a quadratic with two parameter tensors, in float64."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.multiprocessing as mp
from torch import nn


class Quadratic(nn.Module):
    """``L(x) = ½ xᵀAx`` with ``x = concat(W.flatten(), b)``: a 2×3 matrix and a 2-vector, so
    layer-, filter- and element-wise scales all differ."""

    def __init__(self, seed: int = 0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        M = torch.randn(8, 8, generator=g, dtype=torch.float64)
        self.register_buffer("A", (M @ M.T / 8 + torch.eye(8, dtype=torch.float64)).to(dtype))
        self.W = nn.Parameter(torch.randn(2, 3, generator=g, dtype=torch.float64).to(dtype))
        self.b = nn.Parameter(torch.randn(2, generator=g, dtype=torch.float64).to(dtype))

    def flat(self) -> torch.Tensor:
        return torch.cat([self.W.flatten(), self.b])

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        x = self.flat() if x is None else x
        return 0.5 * x @ self.A @ x

    def closure(self):
        def closure(backward: bool = True):
            loss = self()
            if backward:
                loss.backward()
            return loss.detach()
        return closure


def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[:6].view(2, 3), x[6:]


class InfGrad(torch.autograd.Function):
    """Identity forward; the backward puts +inf into the first entry of the gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g.view(-1)[0] = float("inf")
        return g


class ChildFailed(AssertionError):
    pass


def spawn_ranks(worker: Callable, tmp: Path, world: int, names: list[str], timeout: float) -> list[dict]:
    """Run ``worker(rank, world, store, tmp, names)`` on ``world`` spawned processes and load each
    rank's ``rank{r}.pt``; fail (not hang) if a rank fails (with its ``rank{r}.err``) or on timeout."""
    ctx = mp.get_context("spawn")
    tmp.mkdir(parents=True, exist_ok=True)
    procs = [ctx.Process(target=worker, args=(r, world, str(tmp / "store"), str(tmp), names), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [p.exitcode for p in procs]
            if all(c == 0 for c in codes):
                break
            failed = any(c not in (None, 0) for c in codes)
            if failed or time.monotonic() > deadline:
                errors = "\n".join(f"--- rank {r} ---\n{(tmp / f'rank{r}.err').read_text()}"
                                   for r in range(world) if (tmp / f"rank{r}.err").exists())
                why = "a rank failed" if failed else f"timed out after {timeout:.0f} s"
                raise ChildFailed(f"distributed launch: {why}; exit codes {codes}\n{errors}")
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(10)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


GLOO_EXIT_ABORT = "terminate called without an active exception"


def torchrun(ranks: int, script, *args: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node ranks script *args``.

    On a loaded 2-core machine torch's gloo transport sometimes aborts a rank as the process group
    goes away (a C++ thread still joinable at exit: nothing of ours runs there). Such a run gets one
    rerun, which must pass; any other failure is returned as it is."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               str(script), *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0 and GLOO_EXIT_ABORT in proc.stderr:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    return proc


def count_allreduces(model: nn.parallel.DistributedDataParallel) -> list[int]:
    """Install a DDP comm hook that counts bucket all-reduces; returns the (mutable) counter."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    count = [0]

    def hook(state, bucket):
        count[0] += 1
        return allreduce_hook(None, bucket)

    model.register_comm_hook(None, hook)
    return count


def snapshot(model: nn.Module):
    """What a diagnostic must leave as it was: state dict, modes, requires_grad flags, global RNG."""
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()], torch.get_rng_state())


def assert_untouched(model: nn.Module, before) -> None:
    state, modes, flags, rng = before
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


def check_untouched(diagnostic: Callable, model: nn.Module, data, mode: str) -> None:
    """``diagnostic(model, data, mode=..., params="all")`` leaves the model as it was and, in train
    mode too (dropout with a fixed seed, batch statistics), is one deterministic function."""
    before = snapshot(model)
    result = diagnostic(model, data, mode=mode, params="all")
    assert_untouched(model, before)
    assert isinstance(result.to_dict(), dict)
    assert diagnostic(model, data, mode=mode, params="all").to_dict() == result.to_dict()


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
BROWSER_INSTALL = "apt-get install -y chromium chromium-driver && .venv/bin/pip install 'selenium>=4.10'"


def chromium_driver():
    """Headless Debian Chromium through selenium with an explicit driver path (selenium-manager
    never runs: it would try to download a driver); skips the test when either is missing."""
    import pytest

    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip(f"selenium is not installed ({BROWSER_INSTALL})")
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not binary.exists():
            pytest.skip(f"{binary} is missing ({BROWSER_INSTALL})")
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def browser_page_problems(driver, url: str) -> dict:
    """Open ``url`` and report what a reader would see broken: images that did not decode, contents
    links without a target, SEVERE console entries; plus the tables' header rows and the title."""
    import time as _time

    driver.get(url)
    js = driver.execute_script
    images = []
    for _ in range(50):
        images = js("return [...document.images].map(i => [i.complete, i.naturalWidth, i.getAttribute('alt')])")
        if all(c and w > 0 for c, w, _ in images):
            break
        _time.sleep(0.1)
    return {
        "title": driver.title,
        "broken_images": [alt for c, w, alt in images if not (c and w > 0)],
        "images": len(images),
        "tables": js("return [...document.querySelectorAll('table')].map(t => "
                     "[...t.querySelectorAll('thead th')].map(th => th.textContent))"),
        "dead_links": js("return [...document.querySelectorAll('nav.toc a')].map(a => a.getAttribute('href'))"
                         ".filter(h => !document.getElementById(h.slice(1)))"),
        "errors": [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"],
        "text": js("return document.body.innerText"),
    }
