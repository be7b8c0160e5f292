"""The LoRA gauge ``B ← B S, A ← S⁻¹ A``: the function and the effective-weight curvature stay, the
factor-space curvature moves; λ_max against explicit Hessians built by hand (float64)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_untouched, snapshot
from torch import nn
from torch.func import functional_call

from flatminima.diagnostics import lora_gauge, regauge_, regauged, top_eigenvalues
from flatminima.lora import QKVLoRA, add_qkv_lora
from flatminima.lora.protocol import lora_layers

D = torch.float64
# Lanczos to a residual of 1e-12·λ with as many steps as parameters: the eigenvalue error is at most
# the residual (Bauer–Fike), so 1e-10 holds with two digits to spare.
EXACT = {"tol": 1e-12, "bound": "residual", "max_iter": 10_000}


# -- a tiny timm-style ViT: patch conv, class token, pre-norm blocks with a fused qkv ------------


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(d), Attention(d, heads), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, d: int = 6, heads: int = 2, depth: int = 2, image: int = 4, patch: int = 2, classes: int = 3):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, d, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d) * 0.5)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def images(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 4, 4, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)) for n in (4, 2)]


def qkv_vit() -> nn.Module:
    torch.manual_seed(0)
    model = add_qkv_lora(TinyViT().double(), r=2, alpha=3.0, targets="qv")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # B = 0 at initialization: a trained-looking point instead
        for layer in lora_layers(model):
            for a in layer.adapters:
                a.a.copy_(torch.randn(a.a.shape, generator=g, dtype=D) * 0.6)
                a.b.copy_(torch.randn(a.b.shape, generator=g, dtype=D) * 0.6)
    return model


def peft_vit(**config):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = TinyViT().double()
    plain = copy.deepcopy(base)
    model = peft.get_peft_model(base, peft.LoraConfig(r=1, lora_alpha=2, target_modules=["qkv", "proj"],
                                                      init_lora_weights=False, **config))
    return model, plain


# -- the explicit references ----------------------------------------------------------------


def explicit_top(model, tensors, data, substitute=None):
    """λ_max of the explicit Hessian of the loss w.r.t. ``tensors`` (a dict name → tensor of
    ``model``'s parameter names), by torch.autograd.functional.hessian and eigvalsh (the model has
    neither dropout nor BatchNorm: its train and eval modes compute alike)."""
    names = list(tensors)
    sizes = [tensors[n].numel() for n in names]
    x0 = torch.cat([tensors[n].detach().reshape(-1) for n in names])
    count = sum(len(y) for _, y in data)

    def f(x):
        values = {n: c.view(tensors[n].shape) for n, c in zip(names, x.split(sizes))}
        return sum(len(y) * ce(lambda inp: functional_call(model, {**(substitute or {}), **values}, (inp,)), (x_, y))
                   for x_, y in data) / count

    H = torch.autograd.functional.hessian(f, x0)
    return float(torch.linalg.eigvalsh((H + H.T) / 2)[-1]), H.shape[0]


def factor_reference(model, data):
    ids = {id(t) for layer in lora_layers(model) for a in layer.active() for t in (a.a, a.b)}
    return explicit_top(model, {n: p for n, p in model.named_parameters() if id(p) in ids}, data)


def qkv_merged_reference(model, data):
    """A deep copy whose qkv is the plain base Linear and whose weight is W0 + s·[B_qA_q; 0; B_vA_v],
    built by hand, as a free tensor."""
    plain = copy.deepcopy(model)
    merged = {}
    for i, block in enumerate(plain.blocks):
        lora = block.attn.qkv
        d = lora.dim
        q = lora.linear_b_q.weight @ lora.linear_a_q.weight
        v = lora.linear_b_v.weight @ lora.linear_a_v.weight
        merged[f"blocks.{i}.attn.qkv.weight"] = lora.qkv.weight + lora.scaling * torch.cat([q, torch.zeros(d, d, dtype=D), v])
        block.attn.qkv = lora.qkv
    x = data[0][0]
    torch.testing.assert_close(functional_call(plain, merged, (x,)), model(x), rtol=0, atol=1e-12)
    return explicit_top(plain, merged, data)


# -- (a) the transform: the function stays, restore is bitwise --------------------------------


@pytest.mark.parametrize("kind", ["diagonal", "random"])
def test_regauge_keeps_the_outputs_and_restores_bitwise(kind):
    model = qkv_vit()
    x = images()[0][0]
    out = model(x).detach()
    before = snapshot(model)
    args = {"scales": [3.0, -0.25]} if kind == "diagonal" else {"seed": 5, "condition": 20.0}
    gauge = regauge_(model, **args)
    assert torch.equal(torch.get_rng_state(), before[3])  # its own generator
    torch.testing.assert_close(model(x), out, rtol=0, atol=1e-12)
    layer = lora_layers(model)[0]
    assert not torch.equal(layer.adapters[0].a, before[0]["blocks.0.attn.qkv.linear_a_q.weight"])
    for g in gauge.adapters:
        torch.testing.assert_close(g.S @ g.S_inv, torch.eye(2, dtype=D), rtol=0, atol=1e-14)
        assert 1.0 <= g.condition <= (12.0 if kind == "diagonal" else 20.0 + 1e-9)
    if kind == "diagonal":  # B ← B S, A ← S⁻¹ A
        b0, a0 = before[0]["blocks.0.attn.qkv.linear_b_q.weight"], before[0]["blocks.0.attn.qkv.linear_a_q.weight"]
        S = torch.diag(torch.tensor([3.0, -0.25], dtype=D))
        torch.testing.assert_close(layer.adapters[0].b, b0 @ S, rtol=1e-15, atol=0)
        torch.testing.assert_close(layer.adapters[0].a, torch.linalg.inv(S) @ a0, rtol=1e-15, atol=0)
    gauge.restore()
    assert_untouched(model, before)
    with pytest.raises(ValueError, match="Invalid restore"):
        gauge.restore()
    with pytest.raises(RuntimeError, match="inside"), regauged(model, **args):
        raise RuntimeError("inside")
    assert_untouched(model, before)


def test_regauge_on_peft_and_the_orthogonal_gauge():
    model, _ = peft_vit()
    x = images()[0][0]
    out = model(x).detach()
    before = snapshot(model)
    with regauged(model, seed=1, condition=1.0) as gauge:
        torch.testing.assert_close(model(x), out, rtol=0, atol=1e-12)
        S = gauge.adapters[0].S
        torch.testing.assert_close(S @ S.T, torch.eye(1, dtype=D), rtol=0, atol=1e-15)
    assert_untouched(model, before)


class EmbedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.conv = nn.Embedding(7, 4), nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, tokens):  # (n, 9) tokens as a 3×3 image of 4 channels
        return self.conv(self.emb(tokens).transpose(1, 2).reshape(-1, 4, 3, 3))


def test_regauge_embedding_and_conv_layouts_through_peft():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(EmbedConv().double(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "conv"],
                                                                      init_lora_weights=False))
    tokens = torch.randint(0, 7, (3, 9), generator=torch.Generator().manual_seed(0))
    out, before = model(tokens).detach(), snapshot(model)
    merged = [layer.merged() for layer in lora_layers(model)]
    factors = [layer.adapters[0].a.detach().clone() for layer in lora_layers(model)]
    assert [a.layout for layer in lora_layers(model) for a in layer.adapters] == ["embedding", "conv"]
    with regauged(model, seed=3, condition=50.0):
        torch.testing.assert_close(model(tokens), out, rtol=0, atol=1e-12)
        for layer, w, a in zip(lora_layers(model), merged, factors):
            torch.testing.assert_close(layer.merged(), w, rtol=0, atol=1e-13)
            assert not torch.equal(layer.adapters[0].a, a)
    assert_untouched(model, before)


def test_bad_gauges_are_refused_before_anything_is_written():
    model, plain = qkv_vit(), TinyViT()
    before = snapshot(model)
    bad = [{}, {"scales": 2.0, "seed": 0}, {"scales": 0.0}, {"scales": [1.0, 2.0, 3.0]},
           {"scales": [1.0, math.inf]}, {"scales": "big"}, {"seed": 0, "condition": 0.5}, {"seed": 1.5},
           {"scales": 2.0, "adapter": "other"}]
    for kwargs in bad:
        with pytest.raises(ValueError, match="Invalid"):
            regauge_(model, **kwargs)
    with pytest.raises(ValueError, match="Invalid model"):
        regauge_(plain, scales=2.0)
    with pytest.raises(ValueError, match="Invalid transform"):
        lora_gauge(model, ce, images(), transform="balanced")
    assert_untouched(model, before)
    dora, _ = peft_vit(use_dora=True)
    with pytest.raises(ValueError, match="variants"):
        regauge_(dora, scales=2.0)
    with pytest.raises(ValueError, match="variants"):
        lora_gauge(dora, ce, images())


# -- (b) a closed form: one fused qkv layer, isotropic quadratic loss ---------------------------


def quadratic_layer(h: float, at_minimum: bool):
    """QKVLoRA on Linear(3, 9), Q and V at rank 2, ``L = ½h‖W − W*‖²`` (inputs: the identity).
    Returns the model, its data and ``R = W − W*``."""
    torch.manual_seed(0)
    model = QKVLoRA(nn.Linear(3, 9).double(), r=2, alpha=3.0, targets="qv")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for a in lora_layers(model)[0].adapters:
            a.a.copy_(torch.randn(a.a.shape, generator=g, dtype=D))
            a.b.copy_(torch.randn(a.b.shape, generator=g, dtype=D))
        W = lora_layers(model)[0].merged()
        R = torch.zeros(9, 3, dtype=D) if at_minimum else torch.randn(9, 3, generator=g, dtype=D)
        x = torch.eye(3, dtype=D)
        target = x @ (W - R).T + model.qkv.bias
    return model, (x, target), R


def quad_loss(h):
    def loss(model, batch):
        x, target = batch
        return 0.5 * h * (model(x) - target).square().sum()
    return loss


def factor_sam(factors, s, h, R, rho):
    """The one-step SAM sharpness in factor space by hand: ``g_B = s·G Aᵀ``, ``g_A = s·Bᵀ G``
    (``G = hR`` on each adapter's rows), ``ε = ρ g/‖g‖``, ``L = ½h‖R + ΔR(ε)‖²``."""
    G = h * R
    grads = [(s * G[rows] @ A.T, s * B.T @ G[rows]) for B, A, rows in factors]
    norm = math.sqrt(sum(float(gb.square().sum() + ga.square().sum()) for gb, ga in grads))
    dR = torch.zeros_like(R)
    for (B, A, rows), (gb, ga) in zip(factors, grads):
        dR[rows] += s * ((B + rho * gb / norm) @ (A + rho * ga / norm) - B @ A)
    return 0.5 * h * float((R + dR).square().sum()) - 0.5 * h * float(R.square().sum())


def test_closed_form_factor_curvature_moves_by_the_predicted_amount():
    h, s, c = 2.5, 1.5, torch.tensor([3.0, 0.5], dtype=D)
    model, batch, _ = quadratic_layer(h, at_minimum=True)
    mats = [(a.b.detach(), a.a.detach()) for a in lora_layers(model)[0].adapters]

    def predicted(scale):  # λ_max(H_θ) = h s²·max_a(σ₁(B_a)² + σ₁(A_a)²) at the minimum (H_W = hI)
        return h * s * s * max(float(torch.linalg.matrix_norm(B * scale, 2) ** 2
                                     + torch.linalg.matrix_norm(A / scale[:, None], 2) ** 2) for B, A in mats)

    before = snapshot(model)
    report = lora_gauge(model, quad_loss(h), batch, transform=c.tolist(), **EXACT)
    assert_untouched(model, before)
    assert report.transform == "diagonal" and report.factor_numel == 2 * (6 + 6) and report.effective_numel == 27
    for point, scale in ((report.before, torch.ones(2, dtype=D)), (report.after, c)):
        assert point.factor_converged and point.effective_converged
        assert point.factor_lambda_max == pytest.approx(predicted(scale), rel=1e-10)
        assert point.effective_lambda_max == pytest.approx(h, rel=1e-12)
        # never below 2h s²·σ₁(B_a A_a) (reached by the balanced gauge)
        assert point.factor_lambda_max >= 2 * h * s * s * max(float(torch.linalg.matrix_norm(B @ A, 2))
                                                              for B, A in mats) * (1 - 1e-12)
    assert abs(report.change("factor_lambda_max")) > 0.5
    assert abs(report.change("effective_lambda_max")) < 1e-12
    json.dumps(report.to_dict())


def test_closed_form_sharpness_in_both_spaces():
    h, s, rho, c = 2.5, 1.5, 0.1, torch.tensor([3.0, 0.5], dtype=D)
    model, batch, R = quadratic_layer(h, at_minimum=False)
    adapters = lora_layers(model)[0].adapters
    report = lora_gauge(model, quad_loss(h), batch, rho, transform=c.tolist(), **EXACT)
    effective = h * (rho * float(R.norm()) + rho * rho / 2)  # ε = ρ·R/‖R‖ in W
    for point, scale in ((report.before, torch.ones(2, dtype=D)), (report.after, c)):
        factors = [(a.b.detach() * scale, a.a.detach() / scale[:, None], a.rows) for a in adapters]
        assert point.factor_sharpness == pytest.approx(factor_sam(factors, s, h, R, rho), rel=1e-10)
        assert point.effective_sharpness == pytest.approx(effective, rel=1e-10)
        assert point.effective_lambda_max == pytest.approx(h, rel=1e-12)
        assert point.loss == pytest.approx(0.5 * h * float(R.square().sum()), rel=1e-12)
    assert abs(report.change("factor_sharpness")) > 0.1
    assert abs(report.change("effective_sharpness")) < 1e-12


# -- (c) λ_max on a ViT against explicit Hessians ----------------------------------------------


def test_vit_qkv_lora_against_explicit_hessians_and_gauge_invariance():
    model, data = qkv_vit(), images()
    before = snapshot(model)
    report = lora_gauge(model, ce, data, 0.05, transform="random", condition=10.0, seed=4, **EXACT)
    assert_untouched(model, before)
    factor, n_factor = factor_reference(model, data)
    merged, n_merged = qkv_merged_reference(model, data)
    assert (report.factor_numel, report.effective_numel) == (n_factor, n_merged) == (96, 216)
    assert report.before.factor_lambda_max == pytest.approx(factor, rel=1e-10)
    assert report.before.effective_lambda_max == pytest.approx(merged, rel=1e-10)
    lanczos = top_eigenvalues(model, ce, data, params="lora", **EXACT)  # the LoRA subspace: the same factors
    assert lanczos.numel == n_factor and lanczos.values[0] == pytest.approx(factor, rel=1e-10)
    # "after" substitutes the S regauge_ writes, with the same seed and condition
    with regauged(model, seed=4, condition=10.0):
        factor_after, _ = factor_reference(model, data)
        merged_after, _ = qkv_merged_reference(model, data)
    assert report.after.factor_lambda_max == pytest.approx(factor_after, rel=1e-10)
    assert merged_after == pytest.approx(merged, rel=1e-10)
    for q in ("loss", "effective_lambda_max", "effective_sharpness"):
        assert abs(report.change(q)) < 1e-8, q
    assert abs(report.change("factor_lambda_max")) > 1e-2
    assert abs(report.change("factor_sharpness")) > 1e-2
    assert_untouched(model, before)


def test_vit_orthogonal_gauge_leaves_factor_space_alone_too():
    model, data = qkv_vit(), images()
    report = lora_gauge(model, ce, data, 0.05, transform="random", condition=1.0, seed=2, **EXACT)
    assert report.condition == pytest.approx(1.0, abs=1e-12)
    for q in ("loss", "factor_lambda_max", "effective_lambda_max", "factor_sharpness", "effective_sharpness"):
        assert abs(report.change(q)) < 1e-8, q


def test_peft_vit_against_explicit_hessians():
    from peft.tuners.lora import LoraLayer

    model, plain = peft_vit()
    data = images()
    before = snapshot(model)
    report = lora_gauge(model, ce, data, 0.05, transform=2.0, **EXACT)
    assert_untouched(model, before)
    factor, n_factor = factor_reference(model, data)
    assert report.before.factor_lambda_max == pytest.approx(factor, rel=1e-10)
    lanczos = top_eigenvalues(model, ce, data, params="lora", **EXACT)
    assert lanczos.numel == n_factor == report.factor_numel == 2 * (6 + 18 + 6 + 6)
    assert lanczos.values[0] == pytest.approx(factor, rel=1e-10)
    merged = {}  # W0 + s·BA by hand, on a copy of the model before PEFT
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            w = m.base_layer.weight + m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
            merged[name.removeprefix("base_model.model.") + ".weight"] = w.detach()
    x = data[0][0]
    torch.testing.assert_close(functional_call(plain, merged, (x,)), model(x), rtol=0, atol=1e-12)
    reference, n_merged = explicit_top(plain, merged, data)
    assert n_merged == report.effective_numel == 2 * (18 * 6 + 6 * 6)
    assert report.before.effective_lambda_max == pytest.approx(reference, rel=1e-10)
    assert report.after.effective_lambda_max == pytest.approx(reference, rel=1e-10)
    for q in ("loss", "effective_sharpness"):
        assert abs(report.change(q)) < 1e-8, q
    assert abs(report.change("factor_lambda_max")) > 1e-2
    assert np.isfinite(report.after.factor_sharpness)
