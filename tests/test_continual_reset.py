"""Merge-then-reset (seq-lora with reset=True): the merge keeps the function (1e-12 in float64), the
base gains exactly s·BA (bf16: formed in float64, rounded once), the adapter is re-initialised from
(seed, task) without touching the global RNG; seq-lora and its reset on a QKVLoRA ViT end to end."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flatminima.continual.adapters import ContinualLoRA
from flatminima.continual.projection import GPM
from flatminima.continual.strategy import TaskContext
from flatminima.engine import TrainStep
from flatminima.lora import lora_layers
from flatminima.vit import vit_lora

D = torch.float64
TINY = {"image_size": 8, "patch_size": 4, "dim": 8, "depth": 2, "heads": 2}


def perturb(cl, scale=0.3, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cl.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


@torch.no_grad()
def hand_merged(model):
    """``W0 + Σ s·P(BA)`` of every LoRA layer, computed here in float64."""
    out = []
    for layer in lora_layers(model):
        w = layer.weight.detach().double().clone().view(layer.rows, -1)
        for a in layer.active():
            b_, a_ = a.matrices(dtype=D)
            w[a.rows] += a.scaling * b_ @ a_
        out.append(w.view(layer.weight.shape))
    return out


def peft_model(net, dtype=D):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    if net == "mlp":
        module, targets, shape = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), ["0", "2"], (6,)
    else:
        module = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3))
        targets, shape = ["0", "3"], (2, 4, 4)
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=targets, init_lora_weights=False)
    return peft.get_peft_model(module, config).to(dtype), shape


@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_merge_then_reset_keeps_the_function_and_reinits_deterministically(net):
    model, shape = peft_model(net)
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(1), dtype=D)
    cl = ContinualLoRA(model, "seq-lora", reset=True, seed=3)
    rng = torch.get_rng_state()
    draws = []
    for task in range(2):
        cl.start_task(task)
        perturb(cl, seed=task)
        before, merged = model(x).detach(), hand_merged(model)
        cl.end_task()
        assert (model(x) - before).abs().max() < 1e-12
        for layer, w in zip(lora_layers(model), merged):
            assert (layer.weight - w).abs().max() < 1e-14  # W0 + s·BA in place
            (adapter,) = layer.active()
            fan_in = math.prod(adapter.a.shape[1:])
            assert torch.equal(adapter.b, torch.zeros_like(adapter.b))
            assert adapter.a.abs().max() <= 1 / math.sqrt(fan_in) and adapter.a.abs().max() > 0.5 / math.sqrt(fan_in)
        draws.append([layer.active()[0].a.clone() for layer in lora_layers(model)])
    assert torch.equal(torch.get_rng_state(), rng)
    assert not torch.equal(draws[0][0], draws[1][0])  # another task, another draw
    again, _ = peft_model(net)
    cl2 = ContinualLoRA(again, "seq-lora", reset=True, seed=3)
    cl2.start_task(0)
    perturb(cl2, seed=0)
    cl2.end_task()
    assert all(torch.equal(a.active()[0].a, b) for a, b in zip(lora_layers(again), draws[0]))
    other, _ = peft_model(net)
    cl3 = ContinualLoRA(other, "seq-lora", reset=True, seed=4)
    cl3.start_task(0)
    cl3.end_task()
    assert not torch.equal(lora_layers(other)[0].active()[0].a, draws[0][0])


def test_bf16_base_is_merged_in_float64_and_rounded_once():
    model, _ = peft_model("mlp", torch.bfloat16)
    cl = ContinualLoRA(model, "seq-lora", reset=True)
    cl.start_task(0)
    perturb(cl)
    expected = [w.to(torch.bfloat16) for w in hand_merged(model)]
    cl.end_task()
    for layer, w in zip(lora_layers(model), expected):
        assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, w)


def vit(seed=0):
    torch.manual_seed(seed)
    return vit_lora(4, arch=TINY, r=2, alpha=4.0, backend="flatminima").to(D)


def batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=g, dtype=D), torch.randint(0, 4, (4,), generator=g)) for _ in range(n)]


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("reset", [False, True])
def test_seq_lora_on_a_qkv_lora_vit_end_to_end(reset):
    model = vit()
    cl = ContinualLoRA(model, "seq-lora", trainable=("head",), reset=reset, seed=0)
    gpm = GPM(threshold=0.99, layers="lora")
    assert cl.current is None and not cl.peft
    x_probe = batches(1, 99)[0][0]
    for task in range(2):
        cl.start_task(task)
        assert cl.current == "default"
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        assert names == {n for n, _ in model.named_parameters() if ".linear_" in n or n.startswith("head.")}
        data = batches(3, task)
        ctx = TaskContext(task, model, loss_fn, loss_fn, lambda n, d=data: iter(d if n is None else d[:n]),
                          cl.trainable_parameters(), [0, 1], [0, 1], task, torch.device("cpu"))
        gpm.start_task(ctx)
        opt = torch.optim.SGD(cl.trainable_parameters(), lr=0.05)
        step = TrainStep(model, opt, loss_fn, descent_hook=gpm.project)
        mean = lambda: sum(loss_fn(model, b).item() for b in data) / len(data)  # noqa: E731
        first = mean()
        for _ in range(6):
            for batch in data:
                step([batch])
        assert mean() < first, task
        gpm.end_task(ctx)
        qkv = model.blocks[0].attn.qkv.qkv.weight.clone()
        before = model(x_probe).detach()
        cl.end_task()
        assert (model(x_probe) - before).abs().max() < 1e-12
        assert torch.equal(model.blocks[0].attn.qkv.qkv.weight, qkv) != reset  # the merge wrote W0
        assert not any(p.requires_grad for n, p in model.named_parameters() if ".linear_" in n)
    assert set(gpm.memory) == {"lora:blocks.0.attn.qkv", "lora:blocks.1.attn.qkv"}
    # merge(): the model itself, ΔW in the base weights, B = 0, the same function
    before = model(x_probe).detach()
    assert cl.merge() is model and (model(x_probe) - before).abs().max() < 1e-12
    assert all(torch.equal(a.b, torch.zeros_like(a.b)) for layer in lora_layers(model) for a in layer.active())


def test_generic_models_and_reset_options_are_validated():
    model = vit()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    for strategy in ("inc-lora", "o-lora", "n-lora"):
        with pytest.raises(ValueError, match="^Invalid model: .*peft.PeftModel"):
            ContinualLoRA(model, strategy)
    for kwargs, arg in (({"strategy": "inc-lora", "reset": True}, "reset"), ({"reset": 1}, "reset"),
                        ({"config": object()}, "config"), ({"trainable": ("blocks.0.attn",)}, "trainable")):
        kwargs = {"strategy": "seq-lora", **kwargs}
        with pytest.raises(ValueError, match=rf"^Invalid {arg}: "):
            ContinualLoRA(model, kwargs.pop("strategy"), **kwargs)
    assert grads == [p.requires_grad for p in model.parameters()]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="^Invalid model: "):
        ContinualLoRA(nn.Sequential(nn.Linear(2, 2)), "seq-lora", reset=True)
