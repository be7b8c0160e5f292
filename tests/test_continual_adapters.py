"""Continual LoRA on current PEFT: folding keeps the function, penalties match hand computations,
only the current adapter trains, merge keeps every adapter, bad input leaves the model alone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from flatminima.continual.adapters import PAST, STRATEGIES, ContinualLoRA

peft = pytest.importorskip("peft")
from peft.tuners.lora import LoraLayer


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.head = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(100, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


#: name → (network, LoRA targets, head, input shape)
NETS = {"mlp": (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)),
                ["0", "2"], "4", (6,)),
        "conv": (ConvNet, ["conv", "fc"], "head", (2, 5, 5))}


def lora_config(net="mlp", r=2, alpha=4, **kw):
    # init_lora_weights=False: B ≠ 0, so every adapter changes the output
    return peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=NETS[net][1], lora_dropout=0.0,
                           init_lora_weights=False, **kw)


def make(net="mlp", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return peft.get_peft_model(NETS[net][0](), lora_config(net)).to(dtype)


def inputs(net="mlp", n=5, dtype=torch.float64):
    return torch.randn(n, *NETS[net][3], generator=torch.Generator().manual_seed(1), dtype=dtype)


def continual(strategy, net="mlp", tasks=1, model=None, **kw):
    """A managed model in task ``tasks - 1`` (earlier tasks ended), new adapters of r=3, α=5."""
    model = make(net) if model is None else model
    kw.setdefault("config", lora_config(net, r=3, alpha=5))
    cl = ContinualLoRA(model, strategy, trainable=(NETS[net][2],), **kw)
    for t in range(tasks):
        if t:
            cl.end_task()
        cl.start_task(t)
    return model, cl


def layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def by_hand(model, names):
    """The base network with ``W0 + Σ_names s·BA`` written into its weights, computed here."""
    plain = copy.deepcopy(model).unload()
    with torch.no_grad():
        for key, layer in model.base_model.model.named_modules():
            if isinstance(layer, LoraLayer):
                weight = plain.get_submodule(key).weight
                for n in names:
                    if n in layer.lora_A:
                        a, b = layer.lora_A[n].weight, layer.lora_B[n].weight
                        weight += layer.scaling[n] * (b.flatten(1) @ a.flatten(1)).reshape(weight.shape)
    return plain


def perturb_current(cl, scale=0.3):
    """Stand-in for training: move the current adapter (and the head) off its init."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in cl.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ---------------------------------------------------------------------------------------------- 1. fold


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("strategy", ["o-lora", "n-lora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_fold_by_concatenation_keeps_the_function(net, strategy, rslora):
    model, cl = continual(strategy, net, config=lora_config(net, r=3, alpha=5, use_rslora=rslora))
    x = inputs(net)
    for t in range(3):
        if t:
            cl.start_task(t)
        perturb_current(cl)
        before = model(x)
        cl.end_task()
        assert (model(x) - before).abs().max() <= 1e-12
        assert cl.current is None and cl.past == [PAST] and list(model.peft_config) == [PAST]
        for layer in layers(model):  # rank 2 + 3t, scaling 1, the past adapter alone left
            assert layer.lora_A[PAST].weight.shape[0] == 2 + 3 * t and layer.scaling[PAST] == 1.0
            assert set(layer.lora_A) == {PAST}
    # the scalings differed: s = 2 for task 0, 5/3 (5/√3 under rsLoRA) for the others
    assert model.peft_config[PAST].rank_pattern and not any(p.requires_grad for p in layers(model)[0].parameters())


# ------------------------------------------------------------------------- 2. zero weights = plain LoRA


@pytest.mark.parametrize("strategy", ["seq-lora", "inc-lora", "o-lora", "n-lora"])
def test_zero_penalty_trains_as_plain_lora_bit_for_bit(strategy):
    plain = make()
    plain.base_model.model[4].requires_grad_(True)  # the head trains in both runs
    managed = copy.deepcopy(plain)
    cl = ContinualLoRA(managed, strategy, trainable=("4",), orth_weight=0.0, l2_weight=0.0, l1_weight=0.0)
    cl.start_task(0)
    assert [n for n, p in managed.named_parameters() if p.requires_grad] == \
        [n for n, p in plain.named_parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(3)
    opts = [torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=0.1, momentum=0.9),
            torch.optim.SGD(cl.trainable_parameters(), lr=0.1, momentum=0.9)]
    for _ in range(4):
        x, y = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
        for model, opt, extra in ((plain, opts[0], None), (managed, opts[1], cl.penalty)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            (loss if extra is None else loss + extra()).backward()
            opt.step()
    for (n, p), (m, q) in zip(plain.state_dict().items(), managed.state_dict().items()):
        assert n == m and torch.equal(p, q), n


# ---------------------------------------------------------------------------------- 3. penalties by hand


def factors(layer, name):
    a, b = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
    return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)


def hand_orth(model, side, squared):
    total = 0.0
    for layer in layers(model):
        (ap, bp), (an, bn) = factors(layer, PAST), factors(layer, "task1")
        for i in range(ap.shape[0]):
            for j in range(an.shape[0]):
                entries = ([float((ap[i] * an[j]).sum())] if "A" in side else []) + \
                          ([float((bp[:, i] * bn[:, j]).sum())] if "B" in side else [])
                total += sum(e * e if squared else abs(e) for e in entries)
    return total


def hand_norms(model, name, p):
    total = 0.0
    for layer in layers(model):
        for w in factors(layer, name):
            entries = [abs(float(v)) for v in w.flatten()]
            total += math.sqrt(sum(e * e for e in entries)) if p == 2 else sum(entries)
    return total


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("side", ["A", "B", "AB"])
@pytest.mark.parametrize("squared", [False, True])
def test_o_lora_penalty_equals_hand_computation(net, side, squared):
    model, cl = continual("o-lora", net, tasks=2, orth_weight=0.7, l2_weight=0.3, orth_side=side, squared=squared)
    expected = 0.7 * hand_orth(model, side, squared) + 0.3 * hand_norms(model, "task1", 2)
    assert hand_orth(model, side, squared) > 0
    assert math.isclose(cl.penalty().item(), expected, rel_tol=1e-12)


@pytest.mark.parametrize("net", NETS)
def test_norm_penalties_equal_hand_sums(net):
    model, cl = continual("o-lora", net, tasks=2, orth_weight=0.0, l2_weight=0.3)
    assert math.isclose(cl.penalty().item(), 0.3 * hand_norms(model, "task1", 2), rel_tol=1e-12)
    # task 0 has no past: O-LoRA's penalty is the λ₂ term alone
    model, cl = continual("o-lora", net, tasks=1, orth_weight=5.0, l2_weight=0.3)
    assert math.isclose(cl.penalty().item(), 0.3 * hand_norms(model, "default", 2), rel_tol=1e-12)


def reference_update_l1(model, name):
    """``Σ_layers ‖s·B A‖₁`` by plain autograd in float64 (the whole product kept), and its gradients."""
    total, leaves = torch.zeros((), dtype=torch.float64), []
    for layer in layers(model):
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        a_, b_ = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        leaves += [(a, a_), (b, b_)]
        total = total + (layer.scaling[name] * (b_.flatten(1) @ a_.flatten(1))).abs().sum()
    total.backward()
    return total.detach(), [(p, ref.grad) for p, ref in leaves]


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("chunk", [None, 3])
def test_n_lora_penalizes_the_l1_norm_of_the_scaled_update_not_of_the_factors(net, chunk, monkeypatch):
    from flatminima.continual import adapters

    if chunk is not None:  # a tiny chunk: the product is formed a few rows of B at a time
        monkeypatch.setattr(adapters, "_CHUNK", chunk)
    model, cl = continual("n-lora", net, tasks=2, l1_weight=0.2)
    expected, grads = reference_update_l1(model, "task1")
    assert {float(layer.scaling["task1"]) for layer in layers(model)} == {5 / 3}  # s = α/r, not 1
    penalty = cl.penalty()
    assert math.isclose(penalty.item(), 0.2 * expected.item(), rel_tol=1e-12)
    assert not math.isclose(penalty.item(), 0.2 * hand_norms(model, "task1", 1), rel_tol=1e-3)  # the old Σ‖P‖₁
    penalty.backward()
    for p, ref in grads:
        torch.testing.assert_close(p.grad, 0.2 * ref, rtol=1e-12, atol=1e-15)


def test_n_lora_penalty_is_invariant_to_rescaling_the_factors():
    model, cl = continual("n-lora", tasks=2, l1_weight=0.2)
    before = cl.penalty().item()
    with torch.no_grad():
        for layer in layers(model):
            layer.lora_A["task1"].weight.mul_(4.0)
            layer.lora_B["task1"].weight.div_(4.0)
    assert math.isclose(cl.penalty().item(), before, rel_tol=1e-12)


def test_penalty_accumulates_in_float32_and_is_zero_without_weights():
    model, cl = continual("o-lora", model=make().to(torch.bfloat16), tasks=2, l2_weight=0.1)
    assert cl.penalty().dtype == torch.float32 and cl.penalty().dim() == 0
    for strategy, kw in (("o-lora", {"orth_weight": 0.0}), ("inc-lora", {}), ("seq-lora", {})):
        _, cl = continual(strategy, tasks=2, **kw)
        assert not cl.has_penalty and cl.penalty().item() == 0.0
    assert continual("o-lora", tasks=2)[1].has_penalty and continual("n-lora", l1_weight=0.1)[1].has_penalty


# ---------------------------------------------------------------------- 4. what trains, what is active


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("strategy", ["inc-lora", "o-lora", "n-lora"])
def test_only_current_adapter_and_head_train_past_active_and_frozen(net, strategy):
    model, cl = continual(strategy, net, tasks=3, l2_weight=0.5, l1_weight=0.5)
    head = NETS[net][2]
    past = ["default", "task1"] if strategy == "inc-lora" else [PAST]
    assert cl.current == "task2" and cl.past == past and model.active_adapters == past + ["task2"]
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {n for n, _ in model.named_parameters() if ".task2." in n or f"model.{head}." in n}
    assert [id(p) for p in cl.trainable_parameters()] == [id(p) for p in model.parameters() if p.requires_grad]
    x = inputs(net)
    assert torch.allclose(model(x), by_hand(model, past + ["task2"])(x), rtol=0, atol=1e-12)
    assert not torch.allclose(model(x), by_hand(model, ["task2"])(x))  # the past contributes
    cl.penalty().backward()
    for name, p in model.named_parameters():
        if any(f".{n}." in name for n in past):
            assert p.grad is None, name
        elif ".task2." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    cl.end_task()  # between tasks only the head trains; every adapter stays active
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if f"model.{head}." in n}
    assert model.active_adapters == cl.past


def test_seq_lora_trains_one_adapter_and_finetune_everything():
    model, cl = continual("seq-lora", tasks=3)
    assert cl.current == "default" and cl.past == [] and list(model.peft_config) == ["default"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if ".default." in n or "model.4." in n}
    cl.end_task()
    assert cl.past == ["default"] and cl.current is None
    net = nn.Sequential(nn.Linear(3, 2))
    net[0].weight.requires_grad_(False)
    ft = ContinualLoRA(net, "finetune", trainable=("0",))
    ft.start_task(0)
    assert all(p.requires_grad for p in net.parameters()) and ft.trainable_parameters() == list(net.parameters())
    assert ft.penalty().item() == 0.0 and ft.merge() is net and ft.current is None
    ft.end_task()


# ------------------------------------------------------------------------------------------ 5. inc-lora


@pytest.mark.parametrize("net", NETS)
def test_inc_lora_output_is_base_plus_sum_of_adapters(net):
    model, cl = continual("inc-lora", net, tasks=3)
    x = inputs(net)
    names = ["default", "task1", "task2"]
    for layer in layers(model):
        assert set(layer.lora_A) == set(names)
    assert torch.allclose(model(x), by_hand(model, names)(x), rtol=0, atol=1e-12)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".default." in n or ".task1." in n)


# ---------------------------------------------------------------------------------- 6. merge and save


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("strategy", ["seq-lora", "inc-lora", "o-lora", "n-lora"])
def test_merge_keeps_every_adapter(net, strategy):
    model, cl = continual(strategy, net, tasks=2)
    perturb_current(cl)
    x = inputs(net)
    expected = model(x)
    merged = cl.merge()
    assert not layers(merged) and not isinstance(merged, peft.PeftModel)
    assert torch.allclose(merged(x), expected, rtol=0, atol=1e-12)


def test_save_holds_every_adapter_and_the_folded_one_reloads(tmp_path):
    model, cl = continual("o-lora", tasks=2)
    keys = model.state_dict().keys()
    assert any(".past." in k for k in keys) and any(".task1." in k for k in keys)
    model.save_pretrained(tmp_path / "during")
    assert all((tmp_path / "during" / n / "adapter_model.safetensors").exists() for n in (PAST, "task1"))
    perturb_current(cl)
    cl.end_task()  # the fold's config (per-layer ranks, α = r) reloads into the same function
    model.save_pretrained(tmp_path / "after")
    x = inputs()
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model).unload(), tmp_path / "after" / PAST)
    assert torch.allclose(reloaded(x), model(x), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------ 7. bad input


def state(model):
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    return weights, {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("kwargs, arg", [
    ({"strategy": "lora"}, "strategy"),
    ({"orth_weight": -1.0}, "orth_weight"),
    ({"l2_weight": -0.1}, "l2_weight"),
    ({"l1_weight": float("nan")}, "l1_weight"),
    ({"orth_side": "C"}, "orth_side"),
    ({"squared": 1}, "squared"),
    ({"seed": -1}, "seed"),
    ({"trainable": ("nope",)}, "trainable"),
    ({"trainable": "4"}, "trainable"),
    ({"trainable": ("2",)}, "trainable"),  # a LoRA layer
    ({"config": peft.LoraConfig(r=2, target_modules=["0"], use_dora=True)}, "config"),
    ({"config": peft.LoraConfig(r=2, target_modules=["0"], modules_to_save=["4"])}, "config"),
    ({"config": peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights="pissa")}, "config"),
    ({"config": "r=2"}, "config"),
])
def test_bad_input_raises_and_leaves_the_model_alone(kwargs, arg):
    model = make()
    before, grads = state(model)
    options = {"strategy": "o-lora", "trainable": ("4",), **kwargs}
    with pytest.raises(ValueError, match=rf"^Invalid {arg}: "):
        ContinualLoRA(model, options.pop("strategy"), **options)
    after, grads_after = state(model)
    assert grads == grads_after and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_models_and_task_order():
    plain = nn.Sequential(nn.Linear(6, 3))
    before, grads = state(plain)
    for strategy in STRATEGIES[1:]:
        with pytest.raises(ValueError, match="^Invalid model: "):
            ContinualLoRA(plain, strategy)
    assert state(plain)[1] == grads and all(torch.equal(before[k], v) for k, v in state(plain)[0].items())
    two = make()
    two.add_adapter("other", lora_config())
    with pytest.raises(ValueError, match="^Invalid model: "):
        ContinualLoRA(two, "inc-lora")
    model, cl = continual("o-lora", tasks=1)
    with pytest.raises(ValueError, match="^Invalid task: "):
        cl.start_task(1)  # task 0 has not ended
    cl.end_task()
    with pytest.raises(ValueError, match="^Invalid end_task: "):
        cl.end_task()
    with pytest.raises(ValueError, match="^Invalid task: "):
        cl.start_task(2)  # tasks come in order


# ----------------------------------------------------------------------------------------------- 8. RNG


def test_global_rng_untouched_and_adapter_init_reproducible():
    model = make()
    cl = ContinualLoRA(model, "o-lora", trainable=("4",), config=lora_config(r=3, alpha=5), seed=3)
    rng = torch.get_rng_state()
    for t in range(3):
        cl.start_task(t)
        cl.end_task()
    cl.start_task(3)
    assert torch.equal(torch.get_rng_state(), rng)

    def task1(seed):
        _, c = continual("o-lora", tasks=2, seed=seed)
        return [p.detach().clone() for p in c.trainable_parameters() if p.dim() == 2][:2]

    assert all(torch.equal(a, b) for a, b in zip(task1(3), task1(3)))
    assert not torch.equal(task1(3)[0], task1(4)[0])
