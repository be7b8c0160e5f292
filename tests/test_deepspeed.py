"""DeepSpeed ZeRO-1/2 in a loop of one's own (``examples/deepspeed_zero.py``): 2 gloo processes on
DeepSpeed's CPU accelerator take the steps of the engine under DDP on the same micro-batches; bad
engines are refused before anything moves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import torchrun

from flatminima.integrations.deepspeed import DeepSpeedStep, _HandOver

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "deepspeed_zero.py"
installed = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True).returncode == 0
needs_deepspeed = pytest.mark.skipif(not installed, reason="deepspeed is not installed (the `deepspeed` extra)")


def _run(ranks: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return torchrun(ranks, EXAMPLE, *args, timeout=300, env=env)


@needs_deepspeed
@pytest.mark.parametrize("zero,method,hyper", [
    ("2", "sam", "{}"), ("1", "looksam", '{"k": 2}'), ("2", "mrwp", '{"parallel": true, "sigma": 0.01}')])
def test_zero_on_two_ranks_takes_the_ddp_engines_steps(zero, method, hyper):
    """Per-rank ε (SAM), state kept across steps from averaged gradients (LookSAM), parallel m-RWP's
    rank-weighted losses: all equal to the engine under DDP (exit status 1 above 1e-6)."""
    proc = _run(2, "--zero", zero, "--method", method, "--hyper", hyper, "--check")
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("max |w_deepspeed"))
    assert float(line.split("= ")[1].split()[0]) <= 1e-6


@needs_deepspeed
def test_other_zero_stages_are_refused():
    proc = _run(1, "--zero", "3")  # (stage 0 by the same check: test_bad_engines_are_refused_…)
    assert proc.returncode != 0
    assert "Invalid DeepSpeed zero_optimization.stage" in proc.stderr and "expected 1 or 2" in proc.stderr


class _Engine:
    """Just enough of a DeepSpeed engine for the checks made before anything is built."""

    def __init__(self, stage=2, fp16=False, optimizer=None):
        self.stage, self.fp16 = stage, fp16
        self.optimizer = optimizer if optimizer is not None else object()
        self.module = torch.nn.Linear(2, 2)

    def zero_optimization_stage(self):
        return self.stage

    def fp16_enabled(self):
        return self.fp16


@pytest.mark.parametrize("engine,match", [
    (_Engine(stage=3), "zero_optimization.stage"), (_Engine(stage=0), "zero_optimization.stage"),
    (_Engine(fp16=True), "DeepSpeed fp16"),
    (_Engine(), "DeepSpeed optimizer"), (torch.nn.Linear(2, 2), "zero_optimization.stage")])
def test_bad_engines_are_refused_with_the_setting_named(engine, match):
    with pytest.raises(ValueError, match=match):
        DeepSpeedStep(engine, "sam", lambda m, b: m(b).sum())


class _Zero:
    """Just enough of a ZeRO-1/2 optimizer for DeepSpeedStep to build its method."""

    def __init__(self, module):
        self.bit16_groups = [list(module.parameters())]
        self.optimizer = torch.optim.SGD(module.parameters(), lr=0.1)


@pytest.mark.parametrize("hyper", [{}, {"decouple": True}])
def test_decoupled_wsam_is_refused_before_anything_moves(hyper):
    """Decoupled WSAM writes the weights after the base step; DeepSpeed's next step copies its fp32
    master weights over them, so that write would be lost: refused, naming the way out."""
    engine = _Engine()
    engine.optimizer = _Zero(engine.module)
    before = [p.detach().clone() for p in engine.module.parameters()]
    with pytest.raises(ValueError, match=r"Invalid method: 'wsam' with DecoupledSharpness.*decouple=False"):
        DeepSpeedStep(engine, "wsam", lambda m, b: m(b).sum(), **hyper)
    assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    assert all(p.grad is None for p in engine.module.parameters())
    step = DeepSpeedStep(engine, "wsam", lambda m, b: m(b).sum(), decouple=False)  # the coupled form is fine
    assert not step.optimizer.combination.writes_weights_after_step


def test_hand_over_gives_each_parameter_exactly_its_gradient_times_the_loss_scale():
    a, b = torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)
    ga, gb = torch.randn(3, 4), torch.randn(5)
    loss = _HandOver.apply([ga.clone(), gb.clone()], a, b)
    assert loss.item() == 0.0
    (loss * 1024.0).backward()
    assert torch.equal(a.grad, ga * 1024.0) and torch.equal(b.grad, gb * 1024.0)


@needs_deepspeed
def test_readme_deepspeed_block_runs(tmp_path):
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "DeepSpeedStep(engine" in b)
    script = tmp_path / "readme_block.py"
    script.write_text(
        "import torch\nfrom flatminima.data import load_task\nfrom flatminima.models import MLP\n"
        "data = load_task('digits')\ntorch.manual_seed(0)\n"
        "model = MLP(data.x_train[0].numel(), data.num_classes, hidden=32)\n"
        "before = [p.detach().clone() for p in model.parameters()]\n"
        "def loss_fn(m, b):\n    return torch.nn.functional.cross_entropy(m(b[0]), b[1])\n"
        "windows = [[(data.x_train[i:i + 16], data.y_train[i:i + 16]) for i in range(k, k + 64, 16)]"
        " for k in range(0, 320, 64)]\n"
        + block +
        "\nassert step.optimizer.step_count == 5 and torch.isfinite(loss)\n"
        "assert any(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))\n"
        "print('readme block ok')\n")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "readme block ok" in proc.stdout, proc.stderr[-4000:]


@needs_deepspeed
@pytest.mark.parametrize("max_norm, norm", [(1.0, 1.0954), (0.37, 2.5), (0.37, 0.2), (1.0, 1.0 - 1e-6)])
def test_bf16_reference_clips_exactly_as_zero(max_norm, norm):
    """``clip_as_deepspeed`` (the bf16 reference of examples/hf_trainer_distributed.py) gives ZeRO-1/2's
    ``unscale_and_clip_grads`` bit for bit, which ``clip_grad_norm_``'s ``max_norm / (norm + 1e-6)``
    does not for every ``max_norm``: under bf16 a last-bit difference flips weights."""
    import importlib.util

    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    path = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer_distributed.py"
    spec = importlib.util.spec_from_file_location("hf_trainer_distributed", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    grads = [torch.randn(257, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ours = [g.clone() for g in grads]
    example.clip_as_deepspeed(ours, norm, max_norm)
    zero = [g.clone() for g in grads]
    fake = type("Zero", (), {"clip_grad": max_norm, "loss_scale": 1.0, "device": "cpu"})()
    DeepSpeedZeroOptimizer.unscale_and_clip_grads(fake, zero, torch.tensor(norm, dtype=torch.float32))
    assert all(torch.equal(a, b) for a, b in zip(ours, zero))
    assert (norm + 1e-6 <= max_norm) == all(torch.equal(a, g) for a, g in zip(ours, grads))  # clipped only above
    norms = torch.linspace(0.5, 5.0, 1000)
    assert not torch.equal(0.37 / (norms + 1e-6), 1.0 / ((norms + 1e-6) / 0.37))  # clip_grad_norm_'s rounding
