"""The Accelerate helper takes the engine's steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flatminima as fm
from helpers import InfGrad

accelerate = pytest.importorskip("accelerate")

from flatminima.integrations.accelerate import AccelerateStep  # noqa: E402


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(24)]
    return model, data


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


@pytest.mark.parametrize("method,hyper", [("sam", {"rho": 0.1}), ("mrwp", {"sigma": 0.05}), ("gasam", {"steps": 2})])
def test_accelerate_step_matches_the_engine(method, hyper):
    model, data = _setup()
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=3)
    opt = fm.create(method, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **hyper)
    model, opt = accelerator.prepare(model, opt)
    step = AccelerateStep(accelerator, model, opt, loss_fn, max_grad_norm=1.0)
    stepped = [step(batch) for batch in data]
    assert stepped == [False, False, True] * 8

    ref, _ = _setup()
    ref_opt = fm.create(method, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), **hyper)
    engine = fm.TrainStep(ref, ref_opt, loss_fn, max_grad_norm=1.0)
    for k in range(0, len(data), 3):
        engine(data[k:k + 3])
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(step.loss)


@pytest.fixture
def fresh_state():
    """Accelerate keeps one process-wide state, fixed by the first Accelerator: fp16 needs its own."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def fp16_accelerator(**kwargs):
    """An fp16 accelerator as on a GPU, here on the CPU: Accelerate turns fp16 off on the CPU, so we
    give it what it builds on CUDA, a GradScaler and native autocast (CPU fp16 autocast is real)."""
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="fp16", **kwargs)
    accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu", init_scale=2.0**8)
    return accelerator


@pytest.mark.parametrize("method,hyper", [("sam", {"rho": 0.1}), ("mrwp", {"sigma": 0.05})])
def test_fp16_accelerate_step_matches_the_engine_and_skips_an_overflow(method, hyper, fresh_state):
    """fp16: every pass scaled by the accelerator's scaler and autocast to half; the window whose
    perturbed pass overflows (the 2nd) is skipped by the prepared optimizer, as by the engine."""
    calls = {"n": 0, "dtypes": set()}

    def overflowing(model, batch):  # the 2nd window's last pass gets an inf gradient entry
        out = model(batch[0])
        loss = nn.functional.cross_entropy(out.float(), batch[1])
        calls["n"] += 1
        if calls["n"] == 8:  # 4 passes per window with SAM/m-RWP (3 clean + 1 perturbed)
            loss = loss + 0.0 * InfGrad.apply(next(model.parameters())).sum()
        return loss

    model, data = _setup()
    accelerator = fp16_accelerator(gradient_accumulation_steps=3)
    opt = fm.create(method, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **hyper)
    model, opt = accelerator.prepare(model, opt)
    # (The prepared model's outputs are cast back to fp32: look inside.)
    model[3].register_forward_hook(lambda module, args, out: calls["dtypes"].add(out.dtype))
    step = AccelerateStep(accelerator, model, opt, overflowing, max_grad_norm=1.0)
    skipped = []
    for batch in data:
        if step(batch):
            skipped.append(opt.step_was_skipped)
    assert skipped == [False, True] + [False] * 6
    assert calls["dtypes"] == {torch.float16}
    assert accelerator.scaler.get_scale() == 2.0**7

    ref, _ = _setup()
    ref_opt = fm.create(method, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), **hyper)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    calls["n"] = 0
    engine = fm.TrainStep(ref, ref_opt, overflowing, max_grad_norm=1.0, scaler=scaler, autocast_dtype=torch.float16)
    assert [engine(data[k:k + 3]).skipped for k in range(0, len(data), 3)] == skipped
    assert ref_opt.step_count == opt.optimizer.step_count == 7
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_accelerate_step_refuses_plain_optimizers():
    model, _ = _setup()
    accelerator = accelerate.Accelerator(cpu=True)
    with pytest.raises(ValueError, match="optimizer"):
        AccelerateStep(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)
    opt = fm.SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="max_grad_norm"):
        AccelerateStep(accelerator, model, opt, loss_fn, max_grad_norm=0.0)


def test_readme_accelerate_block_runs():
    import re
    from pathlib import Path

    blocks = re.findall(r"```python\n(.*?)```", (Path(__file__).resolve().parents[1] / "README.md").read_text(),
                        flags=re.S)
    block = next(b for b in blocks if "AccelerateStep(" in b)
    model, data = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    loader = torch.utils.data.DataLoader(list(zip(*[torch.cat(t) for t in zip(*data)])), batch_size=4)
    namespace = {"model": model, "loss_fn": loss_fn, "loader": loader, "fm": fm, "torch": torch}
    exec(block, namespace)
    assert namespace["opt"].optimizer.step_count == len(loader) // 4
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
