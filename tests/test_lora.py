"""Flat-LoRA: noise on the merged LoRA weight, applied functionally (the frozen base never moves)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import flatminima as fm
from flatminima.lora import (ROW_SCALES, balancedness, flat_lora_row_scale, frozen_layers, layer_noise, merged_weight, noisy_weight,
                             lora_layers, lora_parameters, row_scale)

peft = pytest.importorskip("peft")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def make(dtype=torch.float64, seed=0, targets=("fc1", "fc2")):
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(targets), lora_dropout=0.0,
                             init_lora_weights=False)  # B ≠ 0, so W' ≠ W0
    return peft.get_peft_model(Tiny(), config).to(dtype)


def data(n=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x).float() if x.dtype != torch.float64 else model(x), y)


def explicit_noisy_copy(model, opt, rho, noise="flatlora", whole_model=False):
    """A copy whose frozen weights hold W0 + ε explicitly, ε regenerated from the method's seeding."""
    noisy = copy.deepcopy(model)
    pairs = zip(frozen_layers(model, whole_model), frozen_layers(noisy, whole_model))
    for i, (layer, twin) in enumerate(pairs):
        weight = twin.weight  # W0: a LoRALayer's base weight, or a plain layer's weight
        row = row_scale(layer, rho, noise)
        eps = layer_noise(opt.rng_seed(stream=i), row, tuple(weight.shape), row.dtype)
        with torch.no_grad():
            weight.add_(eps.to(weight.dtype))
    return noisy


def lora_grads(model):
    return [p.grad.clone() for n, p in model.named_parameters() if p.requires_grad]


def test_row_scale_is_the_merged_weight_row_norm():
    model = make()
    peft_layer = lora_layers(model)[0].module
    W = (peft_layer.base_layer.weight
         + peft_layer.scaling["default"] * peft_layer.lora_B["default"].weight @ peft_layer.lora_A["default"].weight)
    expected = 0.1 * W.norm(dim=1, keepdim=True) / math.sqrt(6)
    for layer in (lora_layers(model)[0], peft_layer):  # a LoRALayer, or the PEFT module read on the spot
        torch.testing.assert_close(flat_lora_row_scale(layer, 0.1), expected.detach(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_gradient_equals_the_explicitly_perturbed_model(micro_batches):
    model = make()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = fm.FlatLoRA(torch.optim.SGD(params, lr=0.0), model=model, rho=0.2)
    noisy = explicit_noisy_copy(model, opt, 0.2)
    x, y = data()
    chunks = [(x[i::micro_batches], y[i::micro_batches]) for i in range(micro_batches)]
    expected_loss = sum(loss_fn(noisy, c) for c in chunks) / micro_batches
    expected_loss.backward()
    result = fm.TrainStep(model, opt, loss_fn)(chunks)
    torch.testing.assert_close(result.loss, expected_loss.detach(), rtol=0, atol=1e-12)
    for got, want in zip(lora_grads(model), lora_grads(noisy)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_base_weights_never_move_and_nothing_lingers(dtype):
    model = make(dtype)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    lora_before = [p.detach().clone() for p in params]
    opt = fm.FlatLoRA(torch.optim.SGD(params, lr=0.1), model=model, rho=0.5)
    rng = torch.get_rng_state()
    x, y = data(dtype=dtype)
    for _ in range(5):
        opt.step(lambda: _backward(loss_fn(model, (x, y))))
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[n]), n
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, params))
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(not m._forward_hooks and "forward" not in m.__dict__ for m in model.modules())
    assert not opt.state  # no weight-sized buffer kept between steps
    assert torch.equal(rng, torch.get_rng_state())


def _backward(loss):
    loss.backward()
    return loss.detach()


def test_ramp_and_exception_safety():
    model = make()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = fm.FlatLoRA(torch.optim.SGD(params, lr=0.1), model=model, rho=0.3, total_steps=10)
    assert opt.strengths() == [0.0]
    opt._step = 5
    assert opt.strengths() == [pytest.approx(0.3 * 0.5 * (1 - math.cos(math.pi * 0.5)))]

    def failing():
        raise RuntimeError("boom")

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(failing)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(not m._forward_hooks and "forward" not in m.__dict__ for m in model.modules())
    assert opt.step_count == 5


def test_mrwp_mix_on_the_merged_weight_and_validation():
    """The same perturbation composes with the m-RWP mix; bad models are refused untouched."""
    model = make()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = fm.FlatLoRA(torch.optim.SGD(params, lr=0.0), model=model, rho=0.2, noisy_weight=0.5)
    noisy = explicit_noisy_copy(model, opt, 0.2)
    x, y = data()
    loss_fn(noisy, (x, y)).backward()
    clean = copy.deepcopy(model)
    loss_fn(clean, (x, y)).backward()
    fm.TrainStep(model, opt, loss_fn)([(x, y)])
    for got, a, b in zip(lora_grads(model), lora_grads(noisy), lora_grads(clean)):
        torch.testing.assert_close(got, 0.5 * a + 0.5 * b, rtol=0, atol=1e-12)

    plain = Tiny()
    with pytest.raises(ValueError, match="model"):
        fm.FlatLoRA(torch.optim.SGD(plain.parameters(), lr=0.1), model=plain)


def test_bert_with_dict_inputs():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, num_labels=2, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    model = peft.get_peft_model(transformers.BertForSequenceClassification(config),
                                peft.LoraConfig(r=4, target_modules=["query", "value"], lora_dropout=0.0,
                                                init_lora_weights=False, task_type="SEQ_CLS"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = fm.FlatLoRA(torch.optim.AdamW(params, lr=1e-3), model=model, rho=0.1)
    assert len(opt.perturbation.layers) == 4
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 60, (4, 7), generator=g), "attention_mask": torch.ones(4, 7, dtype=torch.long),
             "labels": torch.tensor([0, 1, 1, 0])}
    noisy = explicit_noisy_copy(model, opt, 0.1)
    noisy(**batch).loss.backward()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt_lr0 = opt.base.param_groups[0]["lr"]
    opt.base.param_groups[0]["lr"] = 0.0
    result = fm.TrainStep(model, opt, lambda m, b: m(**b).loss)([batch])
    opt.base.param_groups[0]["lr"] = opt_lr0
    for got, want in zip(lora_grads(model), lora_grads(noisy)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(result.loss)
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("noise", ROW_SCALES)
@pytest.mark.parametrize("whole_model", [False, True])
def test_noise_scales_and_whole_model(noise, whole_model):
    """Seed 000's variants: other row scales of W', and every frozen linear layer (fc2 is not a LoRA
    layer here, so only whole_model perturbs it)."""
    model = make(targets=("fc1",))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = fm.FlatLoRA(torch.optim.SGD(params, lr=0.0), model=model, rho=0.2, noise=noise, whole_model=whole_model)
    assert len(opt.perturbation.layers) == (2 if whole_model else 1)
    noisy = explicit_noisy_copy(model, opt, 0.2, noise, whole_model)
    x, y = data()
    loss_fn(noisy, (x, y)).backward()
    fm.TrainStep(model, opt, loss_fn)([(x, y)])
    for got, want in zip(lora_grads(model), lora_grads(noisy)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_row_scales_by_hand():
    layer = lora_layers(make())[0]
    peft_layer = layer.module
    W = (peft_layer.base_layer.weight + peft_layer.scaling["default"] * peft_layer.lora_B["default"].weight
         @ peft_layer.lora_A["default"].weight).detach()
    torch.testing.assert_close(row_scale(layer, 0.5, "filter"), 0.5 * W.norm(dim=1, keepdim=True))
    torch.testing.assert_close(row_scale(layer, 0.5, "matrix"), (0.5 * W.norm()).expand(8, 1))
    torch.testing.assert_close(row_scale(layer, 0.5, "uniform"), torch.full((8, 1), 0.5, dtype=W.dtype))


def test_lora_parameters_follow_peft_structure_with_several_adapters():
    model = make()
    model.add_adapter("second", peft.LoraConfig(r=3, target_modules=["fc2"], init_lora_weights=False))
    default = lora_parameters(model)
    assert [tuple(p.shape) for p in default] == [(2, 6), (8, 2), (2, 8), (3, 2)]
    second = lora_parameters(model, adapter="second", factors="B")
    assert [tuple(p.shape) for p in second] == [(3, 3)]
    with pytest.raises(ValueError, match="adapter"):
        lora_parameters(model, adapter="third")
    with pytest.raises(ValueError, match="factors"):
        lora_parameters(model, factors="C")


def test_sam_lora_normalizes_each_factor():
    """ε_A = ρ·g_A/‖g_A‖ and ε_B = ρ·g_B/‖g_B‖ for every factor; the classifier-free Tiny has only
    LoRA parameters trainable, so the update is −lr·∇L(θ + ε)."""
    model = make()
    factors = lora_parameters(model)
    x, y = data()
    loss_fn(model, (x, y)).backward()
    eps = [0.1 * p.grad / p.grad.norm() for p in factors]
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p, e in zip(lora_parameters(twin), eps):
            p.add_(e)
    loss_fn(twin, (x, y)).backward()
    expected = [p.detach() - 0.5 * q.grad for p, q in zip(factors, lora_parameters(twin))]
    model.zero_grad()
    opt = fm.SAMLoRA(torch.optim.SGD(factors, lr=0.5), model=model, rho=0.1)

    def closure():
        loss = loss_fn(model, (x, y))
        loss.backward()
        return loss

    opt.step(closure)
    for got, want in zip(factors, expected):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-12)


def test_balancedness():
    model = make()
    model.add_adapter("second", peft.LoraConfig(r=3, target_modules=["fc2"], init_lora_weights=False))
    peft_layers = [layer.module for layer in lora_layers(model)]
    expected = sum((layer.lora_A["default"].weight.square().sum() - layer.lora_B["default"].weight.square().sum()).abs()
                   for layer in peft_layers)
    torch.testing.assert_close(balancedness(model), expected)
    layer = peft_layers[1]
    second = (layer.lora_A["second"].weight.square().sum() - layer.lora_B["second"].weight.square().sum()).abs()
    torch.testing.assert_close(balancedness(model, adapter="second"), second)
    balancedness(model).backward()
    assert all(p.grad is not None for p in lora_parameters(model))


@pytest.mark.parametrize("whole_model", [False, True])
def test_bf16_base_weights_bit_identical_after_1000_steps(whole_model):
    model = make(torch.bfloat16, targets=("fc1",))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = fm.FlatLoRA(torch.optim.SGD(params, lr=0.01), model=model, rho=0.05, whole_model=whole_model)
    x, y = data(dtype=torch.bfloat16)
    for _ in range(1000):
        opt.step(lambda: _backward(loss_fn(model, (x, y))))
    assert opt.step_count == 1000
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    # the optimizer keeps no tensor the size of a base weight
    sizes = {p.numel() for p in frozen.values() if p.dim() == 2}
    kept = [t for state in (opt.state, opt.base.state) for s in state.values() for t in s.values() if torch.is_tensor(t)]
    assert all(t.numel() not in sizes for t in kept)


class ConvEmbed(nn.Module):
    """Token embedding + a conv stack + a linear head: LoRA on convolutions and embeddings."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.conv = nn.Conv1d(6, 5, 3, padding=1)
        self.conv_same = nn.Conv1d(5, 4, 3, padding="same", padding_mode="circular")
        self.fc = nn.Linear(4, 3)

    def forward(self, ids):
        h = self.emb(ids).transpose(1, 2)
        h = self.conv_same(torch.tanh(self.conv(h)))
        return self.fc(h.mean(-1))


class PaddedConv2d(nn.Conv2d):
    """A convolution subclass that pads in its own forward (as EfficientNet's static same padding)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pad = nn.ZeroPad2d(1)

    def forward(self, x):
        return nn.functional.conv2d(self.pad(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Conv2dNet(nn.Module):
    def __init__(self):
        super().__init__()
        # c2 carries no adapter (PEFT's LoRA branch would not pad): whole_model noise covers it.
        self.c1, self.c2, self.fc = nn.Conv2d(2, 4, 3, padding=1), PaddedConv2d(4, 3, 3, stride=2), nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.c1(x))).mean((-1, -2)))


@pytest.mark.parametrize("whole_model", [False, True])
@pytest.mark.parametrize("net", ["conv1d_embedding", "conv2d"])
def test_conv_and_embedding_layers_match_the_explicitly_perturbed_model(net, whole_model):
    """LoRA on Conv1d/Conv2d/Embedding bases (a row is an output channel / a token's vector), and
    whole_model noise on the frozen convolutions and embeddings that carry no adapter."""
    torch.manual_seed(0)
    if net == "conv2d":
        module, targets = Conv2dNet(), ["c1", "fc"]
        x = torch.randn(8, 2, 7, 7, dtype=torch.float64)
    else:
        module, targets = ConvEmbed(), ["emb", "conv", "fc"]
        x = torch.randint(0, 11, (8, 9))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    model = peft.get_peft_model(module, config).to(torch.float64)
    y = torch.randint(0, 3, (8,))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = fm.FlatLoRA(torch.optim.SGD(params, lr=0.0), model=model, rho=0.3, whole_model=whole_model)
    assert len(opt.perturbation.layers) == (len(list(module.children())) if whole_model else len(targets))
    noisy = explicit_noisy_copy(model, opt, 0.3, whole_model=whole_model)
    expected = nn.functional.cross_entropy(noisy(x), y)
    expected.backward()
    result = fm.TrainStep(model, opt, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))([(x, y)])
    torch.testing.assert_close(result.loss, expected.detach(), rtol=0, atol=1e-12)
    for got, want in zip(lora_grads(model), lora_grads(noisy)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_merged_weight_of_conv_and_embedding_layers_is_peft_merge():
    torch.manual_seed(1)
    model = peft.get_peft_model(ConvEmbed(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "conv"],
                                                              init_lora_weights=False)).to(torch.float64)
    merged = {name: merged_weight(layer) for name, layer in zip(("emb", "conv"), lora_layers(model))}
    plain = model.merge_and_unload()
    torch.testing.assert_close(merged["emb"], plain.emb.weight.detach(), rtol=0, atol=1e-14)
    torch.testing.assert_close(merged["conv"], plain.conv.weight.detach(), rtol=0, atol=1e-14)


def test_trainable_base_bias_gets_its_gradient():
    model = make(targets=("fc1",))
    model.base_model.model.fc1.base_layer.bias.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = fm.FlatLoRA(torch.optim.SGD(params, lr=0.0), model=model, rho=0.2)
    noisy = explicit_noisy_copy(model, opt, 0.2)
    x, y = data()
    loss_fn(noisy, (x, y)).backward()
    fm.TrainStep(model, opt, loss_fn)([(x, y)])
    assert model.base_model.model.fc1.base_layer.bias.grad is not None
    for got, want in zip(lora_grads(model), lora_grads(noisy)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_noisy_weight_torch_path_and_kernel_choice():
    w = torch.randn(6, 5, dtype=torch.float64)
    s = torch.rand(6, dtype=torch.float64)
    a, b = noisy_weight(w, s, 7), noisy_weight(w, s, 7, kernel="torch")
    assert torch.equal(a, b) and not torch.equal(a, noisy_weight(w, s, 8))
    torch.testing.assert_close(a - w, layer_noise(7, s, (6, 5), torch.float64), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="kernel"):
        noisy_weight(w, s, 7, kernel="triton")
    model = make()
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="kernel"):
        fm.FlatLoRA(torch.optim.SGD(params, lr=0.1), model=model, kernel="fused")


def test_no_noisy_weight_lives_between_forward_and_backward(monkeypatch):
    """The noisy weights are rebuilt in the backward, not kept: after the forward none is alive."""
    import gc
    import weakref

    import flatminima.lora.noise as lora_module
    made = []
    real = lora_module.noisy_weight

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(lora_module, "noisy_weight", recording)
    model = make(targets=("fc1", "fc2"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = fm.FlatLoRA(torch.optim.SGD(params, lr=0.1), model=model, rho=0.2)
    x, y = data()
    alive_after_forward = []

    def closure():
        loss = loss_fn(model, (x, y))
        gc.collect()
        alive_after_forward.append(sum(r() is not None for r in made))
        built = len(made)
        loss.backward()
        # fc2's noisy weight is rebuilt once for ∂L/∂h; fc1's input needs no gradient, so autograd
        # never asked to keep fc1's and it is not rebuilt
        assert built == 2 and len(made) == 3
        return loss.detach()

    opt.step(closure)
    assert alive_after_forward == [0]
