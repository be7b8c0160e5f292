"""The Accelerate helper takes the engine's steps."""

from __future__ import annotations

import copy

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
    stepped = [step(batch) is not None for batch in data]
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
        result = step(batch)
        if result:
            skipped.append(opt.step_was_skipped)
            assert result.skipped == opt.step_was_skipped
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


def _loader(data, batch_size=4):
    rows = list(zip(*[torch.cat(t) for t in zip(*data)]))
    return torch.utils.data.DataLoader(rows, batch_size=batch_size)


def test_accumulate_idiom_with_a_closure_is_refused_naming_accelerate_step():
    """`with accelerator.accumulate(model): opt.step(closure)` would run the closure on every 2nd
    micro-batch only: refused on the first step, weights untouched, AccelerateStep named."""
    model, data = _setup()
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    opt = fm.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    model, opt, loader = accelerator.prepare(model, opt, _loader(data[:4]))
    before = [p.detach().clone() for p in model.parameters()]
    seen = []
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps: 2 .*AccelerateStep\(accelerator, model, opt"):
        for x, y in loader:
            with accelerator.accumulate(model):
                def closure(x=x, y=y):
                    seen.append(len(seen))
                    loss = loss_fn(model, (x, y))
                    accelerator.backward(loss)
                    return loss
                opt.step(closure)
                opt.zero_grad()
    assert seen == []  # refused before the first pass
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_closure_step_without_accumulation_equals_the_plain_closure_step():
    """gradient_accumulation_steps=1: the idiom steps on every micro-batch, as fm.SAM.step(closure)."""
    model, data = _setup()
    ref = copy.deepcopy(model)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=1)
    opt = fm.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    model, opt = accelerator.prepare(model, opt)
    ref_opt = fm.SAM(torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    for batch in data[:6]:
        with accelerator.accumulate(model):
            opt.step(lambda: _backward(accelerator.backward, model, batch))
            opt.zero_grad()
        ref_opt.step(lambda: _backward(torch.Tensor.backward, ref, batch))
    assert opt.optimizer.step_count == 6
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


def _backward(backward, model, batch):
    loss = loss_fn(model, batch)
    backward(loss)
    return loss


def test_accelerate_step_flushes_the_partial_window_at_the_end_of_the_dataloader():
    """10 micro-batches, accumulation 4: Accelerate steps 3 times (windows 4, 4, 2), and so do we,
    each step equal to TrainStep's on the same window; the result carries the window's loss."""
    model, data = _setup()
    data = data[:10]
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=4)
    opt = fm.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    model, opt, loader = accelerator.prepare(model, opt, _loader(data))
    step = AccelerateStep(accelerator, model, opt, loss_fn)
    results = [step(batch) for batch in loader]
    assert [r is not None for r in results] == [False, False, False, True] * 2 + [False, True]
    assert opt.optimizer.step_count == 3

    ref, _ = _setup()
    ref_opt = fm.SAM(torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    engine = fm.TrainStep(ref, ref_opt, loss_fn)
    losses = [engine(data[a:b]).loss for a, b in ((0, 4), (4, 8), (8, 10))]
    got = [r.loss for r in results if r is not None]
    torch.testing.assert_close(torch.stack(got), torch.stack(losses), rtol=1e-6, atol=1e-7)
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert step.window == [] and step.flush() is None


def test_accelerate_step_flush_steps_a_partial_window_by_hand():
    """A loader the accelerator did not prepare has no end-of-dataloader signal: flush() steps the
    rest, equal to TrainStep on those micro-batches."""
    model, data = _setup()
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=4)
    opt = fm.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    step = AccelerateStep(accelerator, model, opt, loss_fn)
    assert [step(b) is not None for b in data[:6]] == [False, False, False, True, False, False]
    result = step.flush()
    ref, _ = _setup()
    engine = fm.TrainStep(ref, fm.SAM(torch.optim.SGD(ref.parameters(), lr=0.1), rho=0.05), loss_fn)
    want = [engine(data[:4]).loss, engine(data[4:6]).loss]
    torch.testing.assert_close(result.loss, want[1])
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_accelerate_step_refuses_to_run_inside_accumulate_when_accelerate_would_drop_the_step():
    model, data = _setup()
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    opt = fm.SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    model, opt = accelerator.prepare(model, opt)
    step = AccelerateStep(accelerator, model, opt, loss_fn)
    before = [p.detach().clone() for p in model.parameters()]
    with accelerator.accumulate(model):  # Accelerate's 1st micro-batch: no sync
        assert step(data[0]) is None
        with pytest.raises(ValueError, match="outside `with accelerator.accumulate"):
            step(data[1])
    assert len(step.window) == 2 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
