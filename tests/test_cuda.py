"""CUDA checks (skipped without a GPU): the fused noisy-weight kernel, Flat-LoRA on CUDA, CPU ↔ CUDA
parity of the engine, and fp16 GradScaler steps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import flatminima as fm
from flatminima.lora import triton as _triton
from flatminima.lora import frozen_layers, lora_layers, noisy_weight, row_scale

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def exact_matmul():
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def test_fused_kernel_is_used_and_draws_standard_normal_noise_per_row():
    assert _triton.triton is not None
    rows, cols = 512, 4096
    w = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    scale = torch.linspace(0.5, 2.0, rows, device="cuda")
    out = noisy_weight(w, scale, seed=123, dtype=torch.float32)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    z = (out - w.float()) / scale[:, None]
    assert abs(z.mean().item()) < 5e-3 and abs(z.std().item() - 1.0) < 5e-3
    per_row = z.std(dim=1)
    assert (per_row - 1.0).abs().max().item() < 0.1  # the scale is applied per row
    # same seed → bit-identical; another seed → other noise; independent of what ran before
    again = noisy_weight(w, scale, seed=123, dtype=torch.float32)
    assert torch.equal(out, again)
    other = noisy_weight(w, scale, seed=124, dtype=torch.float32)
    corr = torch.corrcoef(torch.stack([(other - w.float()).flatten(), (out - w.float()).flatten()]))[0, 1]
    assert abs(corr.item()) < 5e-3
    # bf16 output is the fp32 noisy weight rounded once
    assert torch.equal(noisy_weight(w, scale, 123, torch.bfloat16), out.to(torch.bfloat16))
    # torch path on CUDA: same distribution from a seeded generator
    zt = (noisy_weight(w, scale, 123, torch.float32, kernel="torch") - w.float()) / scale[:, None]
    assert abs(zt.std().item() - 1.0) < 5e-3 and not torch.equal(zt, z)


def _tiny(dtype):
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(64, 128), nn.Linear(128, 128), nn.Linear(128, 10)

        def forward(self, x):
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=False)
    return peft.get_peft_model(Tiny(), config).to("cuda", dtype)


@pytest.mark.parametrize("whole_model", [False, True])
def test_flat_lora_on_cuda_matches_the_explicit_noisy_model(whole_model):
    model = _tiny(torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = fm.FlatLoRA(torch.optim.SGD(params, lr=0.0), model=model, rho=0.3, whole_model=whole_model)
    noisy = copy.deepcopy(model)
    for i, (layer, twin) in enumerate(zip(frozen_layers(model, whole_model), frozen_layers(noisy, whole_model))):
        weight = twin.weight  # W0 of a LoRA layer, or a plain layer's weight
        with torch.no_grad():
            weight.copy_(noisy_weight(weight, row_scale(layer, 0.3).reshape(-1), opt.rng_seed(stream=i)))
    x = torch.randn(32, 64, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    expected = nn.functional.cross_entropy(noisy(x), y)
    expected.backward()
    result = fm.TrainStep(model, opt, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))([(x, y)])
    torch.testing.assert_close(result.loss, expected.detach(), rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), noisy.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_base_weights_bit_identical_and_rng_untouched_on_cuda():
    model = _tiny(torch.bfloat16)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = fm.FlatLoRA(torch.optim.AdamW(params, lr=1e-3), model=model, rho=0.1, whole_model=True)
    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, 10, (32,), device="cuda")
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state()
    before = [p.detach().clone() for p in params]
    for _ in range(200):
        opt.step(lambda: _backward(nn.functional.cross_entropy(model(x).float(), y)))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))
    assert torch.equal(cpu_rng, torch.get_rng_state()) and torch.equal(cuda_rng, torch.cuda.get_rng_state())
    assert len(lora_layers(model)) == 2


def _backward(loss):
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("method,kwargs", [("base", {}), ("sam", {"rho": 0.1}), ("asam", {"rho": 0.5}),
                                           ("gasam", {"epsilon": 0.05, "steps": 2}), ("looksam", {"rho": 0.1, "k": 2}),
                                           ("gsam", {"rho": 0.1}), ("wsam", {"rho": 0.1}), ("vasso", {"rho": 0.1}),
                                           ("friendlysam", {"rho": 0.1}), ("fishersam", {"rho": 0.1}),
                                           ("gam", {"rho": 0.1}), ("cflat", {"rho": 0.1, "strategy": "plus"})])
def test_cpu_and_cuda_take_the_same_steps_in_float64(method, kwargs):
    """The deterministic methods take the same steps on both devices, to float64 rounding (random
    methods draw from per-device generators, so their noise differs by design)."""
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4)).double().to(device)
        opt = fm.create(method, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **kwargs)
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            x = torch.randn(16, 10, generator=g, dtype=torch.float64).to(device)
            y = torch.randint(0, 4, (16,), generator=g).to(device)
            fm.TrainStep(model, opt, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))([(x, y)])
        results.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_fp16_grad_scaler_skips_the_whole_step_on_inf_on_cuda():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).cuda()
    opt = fm.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    step = fm.TrainStep(model, opt, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), scaler=scaler,
                        autocast_dtype=torch.float16)
    x, y = torch.randn(32, 16, device="cuda"), torch.randint(0, 4, (32,), device="cuda")
    assert step([(x, y)]).skipped is False
    before = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    bad = x.clone()
    bad[0, 0] = float("inf")
    result = step([(bad, y)])
    assert result.skipped is True
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert opt.step_count == state["flatminima"]["step"] == 1
    momentum = [s["momentum_buffer"] for s in opt.base.state_dict()["state"].values()]
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(momentum, state["state"].values()))
    assert step([(x, y)]).skipped is False


def _qkv(dtype):  # two adapters on row slices of one fused weight: the stacked factors
    torch.manual_seed(0)
    module = fm.lora.QKVLoRA(nn.Linear(64, 192), r=4, alpha=8)
    for t in module.targets:
        nn.init.normal_(module.part(t)[1].weight, std=0.1)
    return module.to("cuda", dtype)


@pytest.mark.parametrize("make", [_tiny, _qkv])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_row_norms_equal_the_merged_weight_norms(dtype, make):
    from flatminima.lora import merged_weight
    model = make(dtype)
    for layer in lora_layers(model):
        merged = merged_weight(layer)
        for noise, factor in (("flatlora", 0.3 / merged.shape[1] ** 0.5), ("filter", 0.3)):
            want = factor * torch.linalg.vector_norm(merged, dim=1, keepdim=True)
            torch.testing.assert_close(row_scale(layer, 0.3, noise), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", ("factors", "update", "merged", "base", "all"))
def test_lora_supports_on_cuda_match_the_cpu_in_float64_and_keep_bf16_bases(kind):
    from test_lora_supports import closure_for, data, frozen_bases, trainable, vit_lora

    from flatminima.lora import support

    cpu = vit_lora()
    gpu = copy.deepcopy(cpu).cuda()
    x, y = data()
    for model, (xx, yy) in ((cpu, (x, y)), (gpu, (x.cuda(), y.cuda()))):
        opt = fm.SAM(torch.optim.SGD(trainable(model), lr=0.1), rho=0.05, scope=support(model, kind))
        for _ in range(3):
            opt.zero_grad()
            opt.step(closure_for(model, xx, yy))
    for p, q in zip(cpu.state_dict().values(), gpu.state_dict().values()):
        assert torch.allclose(p, q.cpu(), rtol=0, atol=1e-10)
    # bf16 under autocast: the functional weight is built in the autocast dtype; W0 never moves
    model = vit_lora().float().cuda()
    for w in frozen_bases(model):
        w.data = w.data.to(torch.bfloat16).float()
    w0 = [w.clone() for w in frozen_bases(model)]
    opt = fm.SAM(torch.optim.SGD(trainable(model), lr=0.1), rho=0.05, scope=support(model, kind))
    xx, yy = x.float().cuda(), y.cuda()
    for _ in range(20):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            opt.step(closure_for(model, xx, yy))
    assert all(torch.equal(a, b) for a, b in zip(w0, frozen_bases(model)))
    assert all(torch.isfinite(p).all() for p in trainable(model))
