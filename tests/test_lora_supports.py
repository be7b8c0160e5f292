"""The LoRA supports (``scope=fm.lora.support(model, kind)``) against explicit-copy references, float64.

The reference for a support on the frozen weights is the same method on a deep copy whose frozen
weights are made *trainable tensors in scope* (in a parameter group with lr 0, so the step leaves
them alone): the in-place path then writes ``W0 + ε`` into the copy, which is the perturbed model
built by hand. Weight-based scales (ASAM's ``|w|``, RWP's filter norms) read ``ΔW``, ``W0 + ΔW`` or
``W0``: those are checked against ε written out by hand.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import flatminima as fm
from flatminima.core.schedules import derive_seed
from flatminima.lora import supports as lora_support

peft = pytest.importorskip("peft")

KINDS = ("update", "merged", "base", "all")


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(dim, heads), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A timm-style ViT: fused ``blocks[i].attn.qkv``, class token, pre-norm blocks."""

    def __init__(self, dim: int = 8, depth: int = 2, heads: int = 2, classes: int = 3):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, dim) * 0.1)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def vit_lora(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyViT().double()
    for p in model.parameters():
        p.requires_grad_(False)
    fm.lora.add_qkv_lora(model, r=2, alpha=4, targets="qv")
    for layer in fm.lora.lora_layers(model):
        for a in layer.adapters:
            with torch.no_grad():
                a.b.normal_(0, 0.3)  # BA ≠ 0, so ΔW, W0 + ΔW and W0 all differ
    model.head.requires_grad_(True)
    return model.double()


def data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)


def closure_for(model, x, y):
    def closure(backward: bool = True):
        loss = nn.functional.cross_entropy(model(x), y)
        if backward:
            loss.backward()
        return loss.detach()
    return closure


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def frozen_bases(model):
    return [layer.weight for layer in fm.lora.lora_layers(model)]


def run(model, name, kind, steps=2, lr=0.1, **hyper):
    x, y = data()
    opt = fm.create(name, torch.optim.SGD(trainable(model), lr=lr), scope=lora_support.support(model, kind), **hyper)
    for _ in range(steps):
        opt.zero_grad()
        opt.step(closure_for(model, x, y))
    return opt


def run_reference(model, name, kind, steps=2, lr=0.1, **hyper):
    """The method with W0 as trained tensors in scope (group lr 0): the explicit in-place perturbation."""
    x, y = data()
    bases = frozen_bases(model)
    for w in bases:
        w.requires_grad_(True)
    train = [p for p in model.parameters() if p.requires_grad and all(p is not w for w in bases)]
    base_opt = torch.optim.SGD([{"params": train, "lr": lr}, {"params": bases, "lr": 0.0}], lr=lr)
    scope = bases if kind != "all" else train + bases
    opt = fm.create(name, base_opt, scope=scope, **hyper)
    for _ in range(steps):
        opt.zero_grad()
        opt.step(closure_for(model, x, y))
    return opt


def assert_same(a: nn.Module, b: nn.Module, tol: float = 1e-10):
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(p, q, rtol=0, atol=tol), (name, (p - q).abs().max().item())


# Every method whose ε reads gradients only (or the weights of the "base"/"all" supports, which are W0).
GRADIENT_ONLY = {"sam": {}, "cflat": {}, "gasam": {}, "multistepsam": {"steps": 2}, "randomsearchsam": {},
                 "stochasticsam": {}, "aesam": {}, "wsam": {}, "fishersam": {}}
# Their combination takes norms and projections over the trained tensors' gradients, which the
# reference (W0 held by the optimizer) would include: checked on their own below.
NORMED_COMBINATIONS = {"gam": {}, "gsam": {}, "looksam": {"k": 2}}
WEIGHT_READING = {"asam": {}, "layersam": {}, "rwp": {}, "mrwp": {}, "lpfsgd": {}}
STATEFUL = {"friendlysam": {}, "vasso": {}, "ssam": {}}


@pytest.mark.parametrize("name", sorted(GRADIENT_ONLY))
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_methods_equal_the_explicit_copy(name, kind):
    model = vit_lora()
    reference = copy.deepcopy(model)
    w0 = [w.clone() for w in frozen_bases(model)]
    hyper = {k: v for k, v in GRADIENT_ONLY[name].items() if k in fm.hyperparameters(name)}
    run(model, name, kind, **hyper)
    run_reference(reference, name, kind, **hyper)
    assert_same(model, reference)
    assert all(torch.equal(a, b) for a, b in zip(w0, frozen_bases(model)))  # W0 never written
    assert not any(w.requires_grad for w in frozen_bases(model))


@pytest.mark.parametrize("name", sorted(NORMED_COMBINATIONS))
@pytest.mark.parametrize("kind", KINDS)
def test_normed_combinations_run_on_every_support_and_leave_w0_alone(name, kind):
    model = vit_lora()
    before = copy.deepcopy(model)
    w0 = [w.clone() for w in frozen_bases(model)]
    hyper = {k: v for k, v in NORMED_COMBINATIONS[name].items() if k in fm.hyperparameters(name)}
    run(model, name, kind, **hyper)
    assert all(torch.equal(a, b) for a, b in zip(w0, frozen_bases(model)))
    moved = [not torch.equal(p, q) for p, q in zip(trainable(model), trainable(before))]
    assert any(moved)


@pytest.mark.parametrize("name", sorted({**WEIGHT_READING, **STATEFUL}))
@pytest.mark.parametrize("kind", ("base", "all"))
def test_weight_scales_and_state_on_w0_equal_the_explicit_copy(name, kind):
    model = vit_lora()
    reference = copy.deepcopy(model)
    run(model, name, kind, steps=3)
    run_reference(reference, name, kind, steps=3)
    assert_same(model, reference)


@pytest.mark.parametrize("kind", ("update", "merged"))
@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_state_on_rebuilt_tensors_is_refused(name, kind):
    model = vit_lora()
    with pytest.raises(ValueError, match="ascent"):
        fm.create(name, torch.optim.SGD(trainable(model), lr=0.1), scope=lora_support.support(model, kind))


def _weight_grads(model, x, y):
    """∂L/∂W of each LoRA layer's effective weight, by hand (a copy with W0 trainable)."""
    ref = copy.deepcopy(model)
    bases = frozen_bases(ref)
    for w in bases:
        w.requires_grad_(True)
    nn.functional.cross_entropy(ref(x), y).backward()
    return [w.grad.clone() for w in bases]


def _perturbed_step(model, eps, lr):
    """One SGD step of the trained tensors at the explicitly perturbed copy ``W0 + ε``."""
    x, y = data()
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for w, e in zip(frozen_bases(ref), eps):
            w.add_(e)
    nn.functional.cross_entropy(ref(x), y).backward()
    with torch.no_grad():
        for p, q in zip(trainable(model), trainable(ref)):
            p.sub_(lr * q.grad)


@pytest.mark.parametrize("kind", ("update", "merged", "base"))
def test_asam_scale_reads_the_supports_weight(kind):
    rho, eta, lr = 0.05, 0.01, 0.1
    model = vit_lora()
    expected = copy.deepcopy(model)
    x, y = data()
    layers = fm.lora.lora_layers(expected)
    values = [la.delta() if kind == "update" else la.merged() if kind == "merged" else la.weight.detach().clone()
              for la in layers]
    g = _weight_grads(expected, x, y)
    t = [v.abs() + eta for v in values]  # ASAM: ε = ρ·T²g/‖Tg‖, T = |w| + η
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
    _perturbed_step(expected, [rho * ti * ti * gi / norm for ti, gi in zip(t, g)], lr)
    run(model, "asam", kind, steps=1, lr=lr, rho=rho, eta=eta)
    assert_same(model, expected)


@pytest.mark.parametrize("kind", ("update", "merged", "base"))
def test_rwp_filter_noise_reads_the_supports_weight(kind):
    sigma, lr = 0.01, 0.1
    model = vit_lora()
    expected = copy.deepcopy(model)
    layers = fm.lora.lora_layers(expected)
    values = [la.delta() if kind == "update" else la.merged() if kind == "merged" else la.weight.detach().clone()
              for la in layers]
    eps = []
    for i, v in enumerate(values):  # RWP: ε = σ·z·‖W_{i,:}‖, z from the method's own seeded stream i
        gen = torch.Generator().manual_seed(derive_seed(0, 0, 0, i, 0))
        z = torch.randn(v.shape, generator=gen, dtype=v.dtype)
        eps.append(sigma * z * torch.linalg.vector_norm(v.flatten(1), dim=1, keepdim=True))
    _perturbed_step(expected, eps, lr)
    run(model, "rwp", kind, steps=1, lr=lr, sigma=sigma)
    assert_same(model, expected)


@torch.no_grad()
def _effective_change(model, eps_by_id, c):
    total = 0.0
    for layer in fm.lora.lora_layers(model):
        delta = torch.zeros_like(layer.weight)
        for a in layer.adapters:
            ea, eb = eps_by_id.get(id(a.a), torch.zeros_like(a.a)), eps_by_id.get(id(a.b), torch.zeros_like(a.b))
            delta[a.rows] += a.scaling * ((a.b + c * eb) @ (a.a + c * ea) - a.b @ a.a)
        total += (delta ** 2).sum()
    return math.sqrt(total)


def test_effective_radius_puts_the_factor_perturbation_at_norm_rho_in_w():
    rho, lr = 0.3, 0.1
    model = vit_lora()
    expected = copy.deepcopy(model)
    x, y = data()
    factors = fm.lora.lora_parameters(expected)
    nn.functional.cross_entropy(expected(x), y).backward()
    g = [p.grad.clone() for p in factors]
    norm = math.sqrt(sum((gi ** 2).sum() for gi in g))
    eps = [rho * gi / norm for gi in g]  # SAM on the factors: ‖ε‖ = ρ
    by_id = {id(p): e for p, e in zip(factors, eps)}
    lo, hi = 0.0, 1.0
    while _effective_change(expected, by_id, hi) < rho:
        hi *= 2
    for _ in range(200):  # bisection: c with ‖ΔW(c)‖_F = ρ exactly
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _effective_change(expected, by_id, mid) < rho else (lo, mid)
    c = (lo + hi) / 2
    assert abs(c - 1) > 0.05  # the radius does change
    expected.zero_grad()
    with torch.no_grad():
        for p, e in zip(factors, eps):
            p.add_(c * e)
    nn.functional.cross_entropy(expected(x), y).backward()
    with torch.no_grad():
        for p, e in zip(factors, eps):
            p.sub_(c * e)
        for p in trainable(expected):
            p.sub_(lr * p.grad)
    opt = fm.SAM(torch.optim.SGD(trainable(model), lr=lr), rho=rho,
                 scope=lora_support.support(model, "factors", radius="effective"))
    opt.step(closure_for(model, x, y))
    assert_same(model, expected)


def test_peft_model_supports_equal_the_explicit_copy():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    model = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"],
                                                     init_lora_weights=False))
    model = model.double()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)

    def go(m, scope_of):
        opt = fm.SAM(torch.optim.SGD([{"params": trainable(m), "lr": 0.1}], lr=0.1), rho=0.05, scope=scope_of(m))
        for _ in range(2):
            opt.zero_grad()
            opt.step(closure_for(m, x, y))

    go(model, lambda m: lora_support.support(m, "update"))
    bases = frozen_bases(reference)
    for w in bases:
        w.requires_grad_(True)
    train = [p for p in reference.parameters() if p.requires_grad and all(p is not w for w in bases)]
    opt = fm.SAM(torch.optim.SGD([{"params": train, "lr": 0.1}, {"params": bases, "lr": 0.0}], lr=0.1),
                 rho=0.05, scope=bases)
    for _ in range(2):
        opt.zero_grad()
        opt.step(closure_for(reference, x, y))
    assert_same(model, reference)


def test_bad_supports_are_refused_before_anything_changes():
    model = vit_lora()
    with pytest.raises(ValueError, match="kind"):
        lora_support.support(model, "weights")
    with pytest.raises(ValueError, match="radius"):
        lora_support.support(model, "merged", radius="effective")
    with pytest.raises(ValueError, match="whole_model"):
        lora_support.support(model, "update", whole_model=True)
    with pytest.raises(ValueError, match="model"):
        lora_support.support(nn.Linear(2, 2), "merged")
    with pytest.raises(ValueError, match="scope"):
        fm.FlatLoRA(torch.optim.SGD(trainable(model), lr=0.1), model=model, scope=lora_support.support(model, "base"))


def test_explicit_form_is_refused_where_the_clean_pass_must_be_captured():
    model = vit_lora()
    x, y = data()
    opt = fm.SAM(torch.optim.SGD(trainable(model), lr=0.1), rho=0.05, scope=lora_support.support(model, "merged"))
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="clean pass"):
        with opt.perturbed():
            pass
    # a random method needs no clean gradient: the explicit form works
    opt = fm.RWP(torch.optim.SGD(trainable(model), lr=0.1), scope=lora_support.support(model, "merged"))
    w0 = [w.clone() for w in frozen_bases(model)]
    with opt.perturbed():
        nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(w0, frozen_bases(model)))


BF16_METHODS = sorted(set(fm.available()) - {"base", "flatlora", "samlora"})
SUPPORTS = ("factors", "update", "merged", "base", "all")


def _bf16_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    for p in model.parameters():
        p.requires_grad_(False)
    model[0] = nn.Linear(4, 12)
    model[0].requires_grad_(False)
    model[0] = fm.lora.QKVLoRA(model[0], r=2, alpha=4)
    with torch.no_grad():
        for layer in fm.lora.lora_layers(model):
            for a in layer.adapters:
                a.b.normal_(0, 0.1)
    return model.to(torch.bfloat16)


@pytest.mark.parametrize("kind", SUPPORTS)
def test_bf16_frozen_base_is_bit_identical_after_1000_steps_of_every_method(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, generator=g).to(torch.bfloat16)
    for name in [*BF16_METHODS, "flatlora", "samlora"]:
        model = _bf16_model()
        w0 = [w.clone() for w in frozen_bases(model)]
        base = torch.optim.SGD(trainable(model), lr=1e-3)
        if name in ("flatlora", "samlora"):
            if kind != "factors":
                continue  # their support is fixed: the merged weight, the factors
            opt = fm.create(name, base, model=model)
        else:
            support = lora_support.support(model, kind)
            if kind in ("update", "merged") and name in STATEFUL:
                continue  # refused (tested above)
            opt = fm.create(name, base, scope=support)

        def closure(backward=True, loss_weight=1.0):
            loss = model(x).float().square().mean()
            if backward:
                (loss * loss_weight).backward()
            return loss.detach()

        for _ in range(1000):
            opt.zero_grad()
            opt.step(closure)
        assert all(torch.equal(a, b) for a, b in zip(w0, frozen_bases(model))), name
        assert all(torch.isfinite(p).all() for p in trainable(model)), name


def test_runner_methods_take_a_support_setting():
    import dataclasses

    from flatminima.experiment import preset

    cfg = dataclasses.replace(preset("quick"), methods={
        "sam_update": {"method": "sam", "rho": 0.05, "support": "update"},
        "sam_effective": {"method": "sam", "support": {"kind": "factors", "radius": "effective"}},
        "bad_kind": {"method": "sam", "support": "weights"},
        "bad_key": {"method": "sam", "support": {"kind": "base", "rho": 1}},
        "flatlora": {"support": "base"}})
    assert cfg.method_spec("sam_update")[2] == {"rho": 0.05, "support": "update"}
    assert cfg.method_spec("sam_effective")[2]["support"]["radius"] == "effective"
    with pytest.raises(ValueError, match="methods.bad_kind: Invalid kind"):
        cfg.method_spec("bad_kind")
    with pytest.raises(ValueError, match="methods.bad_key: Invalid support"):
        cfg.method_spec("bad_key")
    with pytest.raises(ValueError, match="methods.flatlora: Invalid scope"):
        cfg.method_spec("flatlora")


def test_flat_lora_on_the_fused_qkv_vit_equals_the_explicit_noisy_copy():
    rho, lr = 0.05, 0.1
    model = vit_lora()
    expected = copy.deepcopy(model)
    eps = []
    for i, layer in enumerate(fm.lora.lora_layers(expected)):  # ε = Z ⊙ ρ‖W'_{i,:}‖/√n_in, Z from stream i
        w = layer.merged()
        scale = rho * torch.linalg.vector_norm(w.flatten(1), dim=1, keepdim=True) / math.sqrt(w[0].numel())
        gen = torch.Generator().manual_seed(derive_seed(0, 0, 0, i, 0))
        eps.append(torch.randn(w.shape, generator=gen, dtype=w.dtype) * scale)
    _perturbed_step(expected, eps, lr)
    opt = fm.FlatLoRA(torch.optim.SGD(trainable(model), lr=lr), model=model, rho=rho)
    opt.step(closure_for(model, *data()))
    assert_same(model, expected)


def test_sam_lora_on_the_fused_qkv_vit_equals_the_explicit_copy():
    rho, lr = 0.05, 0.1
    model = vit_lora()
    expected = copy.deepcopy(model)
    x, y = data()
    factors = fm.lora.lora_parameters(expected)
    nn.functional.cross_entropy(expected(x), y).backward()
    eps = [rho * p.grad / p.grad.norm() for p in factors]  # each factor normalized on its own
    expected.zero_grad()
    with torch.no_grad():
        for p, e in zip(factors, eps):
            p.add_(e)
    nn.functional.cross_entropy(expected(x), y).backward()
    with torch.no_grad():
        for p, e in zip(factors, eps):
            p.sub_(e)
        for p in trainable(expected):
            p.sub_(lr * p.grad)
    opt = fm.SAMLoRA(torch.optim.SGD(trainable(model), lr=lr), model=model, rho=rho)
    opt.step(closure_for(model, x, y))
    assert_same(model, expected)
