"""The LoRA protocol: docs/lora.md's example runs as written and its registered classes compute what
the library reads; PEFT's and QKVLoRA's readers; Flat-LoRA, landscapes and the scopes through it.

The guide registers ``MyLoRA`` and ``FusedKV``; the fixture unregisters them afterwards.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import flatminima as fm
from flatminima.lora import (LoRALayer, LowRankAdapter, QKVLoRA, add_qkv_lora, frozen_layers, layer_noise,
                             lora_layers, lora_parameters, merged_weight, register_lora_layer, row_scale,
                             unregister_lora_layer)
from flatminima.lora import protocol
from flatminima.lora.layers import stacked_factors

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "lora.md"
D = torch.float64


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)


@pytest.fixture(scope="module")
def guide():
    """The namespace of the guide's code blocks, executed in order; its classes unregistered after."""
    namespace: dict = {"__name__": "lora_guide"}
    try:
        for i, block in enumerate(python_blocks()):
            exec(compile(block, f"{GUIDE.name}[block {i}]", "exec"), namespace)
        yield namespace
    finally:
        for name in ("MyLoRA", "FusedKV"):
            if namespace.get(name) in protocol._READERS:
                unregister_lora_layer(namespace[name])


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter redrawn (B ≠ 0, so that W ≠ W0), in float64."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def _guide_net(guide, seed=0):
    torch.manual_seed(seed)
    model = _randomize(guide["Net"]().to(D), seed)
    for layer in lora_layers(model):
        layer.base.requires_grad_(False)
    return model


def _noisy_twin(model, opt, rho):
    """A copy whose base weights hold ``W0 + ε`` explicitly, ``ε`` built here from ``W0 + s·P(BA)``."""
    twin = copy.deepcopy(model)
    for i, (layer, other) in enumerate(zip(lora_layers(model), lora_layers(twin))):
        w = layer.weight.detach().clone()
        for a in layer.active():
            b_m, a_m = a.matrices()
            w[a.rows] += a.scaling * (b_m @ a_m).detach().reshape(w[a.rows].shape)
        scale = rho * torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1) / math.sqrt(w[0].numel())
        with torch.no_grad():
            other.weight.add_(layer_noise(opt.rng_seed(stream=i), scale, tuple(w.shape), D))
    return twin


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


# -- the guide --------------------------------------------------------------------------------


def test_the_guide_runs_and_registers_its_classes(guide):
    assert len(python_blocks()) >= 4
    model = guide["model"]
    assert [layer.name for layer in lora_layers(model)] == ["fc1", "kv"]
    assert fm.lora.lora_layers is protocol.lora_layers
    assert [id(p) for p in lora_parameters(model)] == [id(model.fc1.A), id(model.fc1.B), id(model.kv.A), id(model.kv.B)]
    assert torch.isfinite(guide["result"].loss)


def test_registered_layers_compute_with_the_merged_weight(guide):
    model = _guide_net(guide)
    x = torch.randn(5, 8, dtype=D)
    fc1, kv = lora_layers(model)
    torch.testing.assert_close(F.linear(x, fc1.merged(), model.fc1.base.bias), model.fc1(x), rtol=0, atol=1e-12)
    h = torch.randn(5, 16, dtype=D)
    torch.testing.assert_close(F.linear(h, kv.merged(), model.kv.kv.bias), model.kv(h), rtol=0, atol=1e-12)
    torch.testing.assert_close(merged_weight(kv), kv.merged(), rtol=0, atol=0)
    # the fused adapter covers the V rows only: the K rows of W are W0's
    assert torch.equal(kv.merged()[:16], model.kv.kv.weight[:16].detach())
    assert torch.equal(row_scale(kv, 0.1)[:16], row_scale(model.kv.kv, 0.1)[:16])


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_flat_lora_on_registered_classes_equals_an_explicit_copy(guide, micro_batches):
    model = _guide_net(guide, seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = fm.FlatLoRA(torch.optim.SGD(params, lr=0.0), model=model, rho=0.3)
    twin = _noisy_twin(model, opt, 0.3)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(12, 8, generator=g, dtype=D), torch.randint(0, 3, (12,), generator=g)
    chunks = [(x[i::micro_batches], y[i::micro_batches]) for i in range(micro_batches)]
    expected = sum(guide["loss_fn"](twin, c) for c in chunks) / micro_batches
    expected.backward()
    frozen = [layer.weight.detach().clone() for layer in lora_layers(model)]
    result = fm.TrainStep(model, opt, guide["loss_fn"])(chunks)
    torch.testing.assert_close(result.loss, expected.detach(), rtol=0, atol=1e-10)
    for got, want in zip(_grads(model), _grads(twin)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert all(torch.equal(a, layer.weight) for a, layer in zip(frozen, lora_layers(model)))


def test_unregistering_makes_the_library_stop_seeing_a_class(guide):
    model = _guide_net(guide)
    unregister_lora_layer(guide["MyLoRA"])
    try:
        assert [layer.name for layer in lora_layers(model)] == ["kv"]
        assert len(lora_parameters(model)) == 2
        unregister_lora_layer(guide["FusedKV"])
        assert lora_layers(model) == []
        with pytest.raises(ValueError, match="model"):
            fm.FlatLoRA(torch.optim.SGD(model.head.parameters(), lr=0.1), model=model)
        with pytest.raises(ValueError, match="model"):
            lora_parameters(model)
    finally:
        register_lora_layer(guide["MyLoRA"], guide["read_my_lora"])
        register_lora_layer(guide["FusedKV"], guide["read_fused_kv"])
    assert len(lora_layers(model)) == 2


# -- PEFT -------------------------------------------------------------------------------------


class ConvEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.conv = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, ids):
        h = self.emb(ids)                      # (n, 4, 4, 6)
        h = self.conv(h.permute(0, 3, 1, 2))
        return self.fc(torch.tanh(h).mean((-1, -2)))


def _peft_model():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "conv", "fc"], init_lora_weights=False)
    model = peft.get_peft_model(ConvEmbed(), config)
    model.add_adapter("second", peft.LoraConfig(r=3, lora_alpha=3, target_modules=["conv", "fc"],
                                                init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    return model.to(D)


def test_peft_reader_delta_is_peft_delta_with_several_adapters():
    model = _peft_model()
    layers = lora_layers(model)
    assert [layer.name.rsplit(".", 1)[-1] for layer in layers] == ["emb", "conv", "fc"]
    for layer in layers:
        names = [a.name for a in layer.active()]
        assert names == (["default"] if layer.name.endswith("emb") else ["default", "second"])
        want = sum(layer.module.get_delta_weight(n) for n in names)
        torch.testing.assert_close(layer.delta(), want, rtol=0, atol=1e-14)
    merged = {layer.name: merged_weight(layer) for layer in layers}
    plain = copy.deepcopy(model).merge_and_unload()
    for layer in layers:
        torch.testing.assert_close(merged[layer.name], plain.get_submodule(layer.name.split("model.", 2)[-1]).weight,
                                   rtol=0, atol=1e-14)


def _conv_matches_its_merged_weight(model, layer):
    conv = layer.module
    h = model.base_model.model.emb(torch.randint(0, 11, (2, 4, 4))).permute(0, 3, 1, 2)
    torch.testing.assert_close(F.conv2d(h, merged_weight(layer), conv.base_layer.bias, padding=1), conv(h),
                               rtol=0, atol=1e-12)


def test_peft_merged_and_disabled_adapters_are_left_out():
    model = _peft_model()
    conv = model.base_model.model.conv
    conv.merge()  # W0 now holds both adapters: the merged weight counts them once
    (layer,) = [lay for lay in lora_layers(model) if lay.module is conv]
    assert layer.active() == [] and torch.equal(merged_weight(layer), layer.weight)
    _conv_matches_its_merged_weight(model, layer)
    conv.unmerge()
    with model.disable_adapter():
        assert all(not layer.active() for layer in lora_layers(model))
        assert all(torch.equal(merged_weight(layer), layer.weight) for layer in lora_layers(model))
        with pytest.raises(ValueError, match="model"):
            lora_parameters(model)
    assert len(lora_parameters(model, adapter="second")) == 4  # named adapters, active or not
    (layer,) = [lay for lay in lora_layers(model) if lay.module is conv]
    assert [a.name for a in layer.active()] == ["default", "second"]
    _conv_matches_its_merged_weight(model, layer)


def test_peft_partly_merged_layer_computes_its_base_alone():
    model = _peft_model()
    conv = model.base_model.model.conv
    conv.merge(adapter_names=["second"])
    (layer,) = [lay for lay in lora_layers(model) if lay.module is conv]
    _conv_matches_its_merged_weight(model, layer)


def test_peft_variants_and_trainable_bases_are_refused():
    peft = pytest.importorskip("peft")
    for options in ({"use_dora": True}, {"lora_bias": True}):
        model = peft.get_peft_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)),
                                    peft.LoraConfig(r=2, target_modules=["0"], **options))
        params = [p for p in model.parameters() if p.requires_grad]
        with pytest.raises(ValueError, match=r"Invalid model.*variant"):
            fm.FlatLoRA(torch.optim.SGD(params, lr=0.1), model=model)
        with pytest.raises(ValueError, match="layer"):
            merged_weight(lora_layers(model)[0])
        with pytest.raises(ValueError, match="model"):
            fm.diagnostics.loss_landscape(model, lambda m, b: m(b).sum(), torch.randn(3, 4), merged=True)
        fm.SAMLoRA(torch.optim.SGD(params, lr=0.1), model=model)  # SAM on the factors needs no merged weight


# -- QKVLoRA ----------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = Attention(d)

    def forward(self, x):
        return x + self.attn(x)


class TinyViT(nn.Module):
    def __init__(self, d=4, depth=2, classes=3):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(d) for _ in range(depth)])
        self.norm_proj = nn.Linear(d, d)   # frozen, not a LoRA layer
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.norm_proj(self.blocks(x)).mean(1))


def _vit(dtype=D, targets="qv", seed=0):
    torch.manual_seed(seed)
    model = add_qkv_lora(TinyViT(), r=2, alpha=4, targets=targets)
    model.requires_grad_(False)
    for layer in lora_layers(model):
        for a in layer.adapters:
            a.a.requires_grad_(True)
            a.b.requires_grad_(True)
            with torch.no_grad():
                a.b.normal_(0, 0.3)
    model.head.requires_grad_(True)
    return model.to(dtype)


@pytest.mark.parametrize("targets", ["qv", "k", "qkv"])
def test_qkv_lora_merged_weight_is_its_function(targets):
    model = _vit(targets=targets)
    x = torch.randn(2, 5, 4, dtype=D)
    for layer, block in zip(lora_layers(model), model.blocks):
        module = block.attn.qkv
        assert isinstance(module, QKVLoRA) and layer.module is module
        torch.testing.assert_close(F.linear(x, merged_weight(layer), module.qkv.bias), module(x), rtol=0, atol=1e-12)
        rows = row_scale(layer, 0.2)
        plain = row_scale(module.qkv, 0.2)
        for i, t in enumerate("qkv"):
            part = slice(4 * i, 4 * (i + 1))
            assert torch.equal(rows[part], plain[part]) == (t not in targets)


def test_flat_lora_and_landscapes_on_qkv_lora():
    model = _vit()
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(lora_parameters(model)) == 8 and len(frozen_layers(model)) == 2
    opt = fm.FlatLoRA(torch.optim.SGD(params, lr=0.0), model=model, rho=0.2)
    twin = _noisy_twin(model, opt, 0.2)
    x, y = torch.randn(6, 5, 4, dtype=D), torch.randint(0, 3, (6,))
    expected = F.cross_entropy(twin(x), y)
    expected.backward()
    result = fm.TrainStep(model, opt, lambda m, b: F.cross_entropy(m(b[0]), b[1]))([(x, y)])
    torch.testing.assert_close(result.loss, expected.detach(), rtol=0, atol=1e-10)
    for got, want in zip(_grads(model), _grads(twin)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)

    def ce(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    landscape = fm.diagnostics
    (d,) = landscape.landscape_directions(model, count=1, merged=True, seed=5)
    layers = lora_layers(model)
    assert [tuple(t.shape) for t in d] == [(12, 4), (12, 4)]
    r = landscape.loss_landscape(model, ce, (x, y), alphas=[0.3], merged=True, seed=5)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for layer, delta in zip(lora_layers(moved), d):
            layer.weight.add_(0.3 * delta)
    with torch.no_grad():
        assert r.loss[0] == pytest.approx(float(ce(moved.eval(), (x, y))), rel=1e-12)
    for t, layer in zip(d, layers):  # filter-normalized on the merged weight
        torch.testing.assert_close(t.norm(dim=1), merged_weight(layer).norm(dim=1), rtol=1e-12, atol=0)
    _, chosen = fm.diagnostics.select_params(model, "lora")
    assert [id(p) for p in chosen] == [id(p) for p in lora_parameters(model)]


def test_inside_layers_and_trainable_bases():
    model = _vit()
    whole = frozen_layers(model, whole_model=True)
    assert [type(m).__name__ for m in whole] == ["LoRALayer", "LoRALayer", "Linear"]
    assert whole[2] is model.norm_proj  # the qkv base and the A/B linears are inside the LoRA layers
    model.blocks[0].attn.qkv.qkv.weight.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="trainable base weight"):
        fm.FlatLoRA(torch.optim.SGD(params, lr=0.1), model=model)


def test_nested_lora_modules_are_read_once_and_variants_refused():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(4, 4)
            self.inner = QKVLoRA(nn.Linear(4, 12))  # inside another LoRA module: not read
            self.A, self.B = nn.Parameter(torch.randn(1, 4)), nn.Parameter(torch.randn(4, 1))

        def forward(self, x):
            return self.base(x) + x @ self.A.T @ self.B.T

    register_lora_layer(Outer, lambda m: LoRALayer(m, m.base, [LowRankAdapter(m.A, m.B, 1.0, variant=m.variant)]))
    try:
        outer = Outer().requires_grad_(False)
        outer.A.requires_grad_(True)
        outer.variant = None
        model = nn.Sequential(outer, nn.Linear(4, 4).requires_grad_(False))
        assert [layer.module for layer in lora_layers(model)] == [outer]
        assert [type(m).__name__ for m in frozen_layers(model, True)] == ["LoRALayer", "Linear"]
        fm.FlatLoRA(torch.optim.SGD([outer.A], lr=0.1), model=model)
        outer.variant = "custom"
        with pytest.raises(ValueError, match=r"variant \(custom\)"):
            fm.FlatLoRA(torch.optim.SGD([outer.A], lr=0.1), model=model)
    finally:
        unregister_lora_layer(Outer)


def test_bf16_qkv_lora_base_bit_identical_after_1000_flat_lora_steps():
    model = _vit(torch.bfloat16)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = fm.FlatLoRA(torch.optim.SGD(params, lr=0.01), model=model, rho=0.05, whole_model=True)
    x, y = torch.randn(4, 3, 4, dtype=torch.bfloat16), torch.randint(0, 3, (4,))

    def closure():
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        return loss.detach()

    for _ in range(1000):
        opt.step(closure)
    assert opt.step_count == 1000
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


def test_stacked_factors_of_the_fused_row_norms_give_the_merged_weight():
    """The fused row-norm kernel sees ``W0 + s·B A``: several adapters, or adapters on row slices,
    are stacked along the rank with ``B`` zero outside each adapter's rows."""
    qkv = lora_layers(_vit(torch.float32))[0]
    peft_layer = next(layer for layer in lora_layers(_peft_model().float()) if layer.name.endswith("fc"))
    plain = lora_layers(_vit(torch.float32, targets="q"))[0]
    for layer, rank in ((qkv, 4), (peft_layer, 5), (plain, 2)):
        b, a, s = stacked_factors(layer)
        assert a.shape[0] == rank and b.shape == (layer.rows, rank)
        torch.testing.assert_close(layer.weight + s * b @ a, merged_weight(layer), rtol=0, atol=1e-6)


def test_flat_lora_follows_adapters_activated_after_it_was_built():
    model = _peft_model()
    model.base_model.set_adapter(["default"])
    model.requires_grad_(False)
    params = lora_parameters(model, "default") + lora_parameters(model, "second")
    for p in params:
        p.requires_grad_(True)
    opt = fm.FlatLoRA(torch.optim.SGD(params, lr=0.0), model=model, rho=0.2)
    model.base_model.set_adapter(["default", "second"])  # now W = W0 + Σ of both adapters
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    twin = _noisy_twin(model, opt, 0.2)
    ids, y = torch.randint(0, 11, (4, 4, 4)), torch.randint(0, 3, (4,))
    expected = F.cross_entropy(twin(ids), y)
    expected.backward()
    result = fm.TrainStep(model, opt, lambda m, b: F.cross_entropy(m(b[0]), b[1]))([(ids, y)])
    torch.testing.assert_close(result.loss, expected.detach(), rtol=0, atol=1e-10)
    for got, want in zip(_grads(model), _grads(twin)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
