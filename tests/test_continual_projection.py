"""GPM and OGD: the basis equals an explicit SVD with GPM's threshold, the projected gradient equals
g − g M Mᵀ, old outputs of a plain Linear survive SGD exactly, OGD's memory equals an explicit
Gram–Schmidt, hooks and modes are restored, options are validated."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flatminima.continual.projection import GPM, OGD, extend_basis, input_covariances
from flatminima.continual.strategy import TaskContext, make_baselines, split_strategy
from flatminima.lora import QKVLoRA

D = torch.float64


def context(model, batches, index=0, params=None, seed=0):
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    return TaskContext(index=index, model=model, loss_fn=None, memory_loss_fn=None,
                       batches=lambda n: iter(batches if n is None else batches[:n]), parameters=params,
                       classes=[0, 1, 2], seen_classes=[0, 1, 2], seed=seed, device=torch.device("cpu"))


def projector(u):
    return u @ u.T


def hand_basis(R, threshold, M=None):
    """GPM's update by an explicit SVD of the representation matrix (numpy)."""
    total = (R ** 2).sum()
    if M is None:
        M = np.zeros((R.shape[0], 0))
    Rh = R - M @ (M.T @ R)
    kept = ((M @ (M.T @ R)) ** 2).sum()
    U, S, _ = np.linalg.svd(Rh, full_matrices=False)
    k = 0
    while kept + (S[:k] ** 2).sum() < threshold * total and k < (S > 1e-12).sum():
        k += 1
    return np.concatenate([M, U[:, :k]], 1), k


# ------------------------------------------------------------------------- basis and threshold


def test_basis_equals_svd_and_threshold_picks_the_smallest_k():
    rng = np.random.default_rng(0)
    U0, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    V0, _ = np.linalg.qr(rng.standard_normal((8, 5)))
    R = U0 @ np.diag([3.0, 2.0, 1.0, 0.5, 0.1]) @ V0.T  # energies 9, 4, 1, .25, .01 of 14.26
    cov = torch.tensor(R @ R.T)
    for threshold, k in ((0.6, 1), (0.9, 2), (0.97, 3), (0.99, 4), (1.0, 5)):
        M = extend_basis(cov, None, threshold)
        assert M.shape == (5, k)
        assert np.abs(projector(M.numpy()) - projector(U0[:, :k])).max() < 1e-10
    # second task: residual after projecting out M, the energy counted against the whole R2
    M = extend_basis(cov, None, 0.9)
    R2 = rng.standard_normal((5, 6))
    M2 = extend_basis(torch.tensor(R2 @ R2.T), M, 0.95)
    ref, k2 = hand_basis(R2, 0.95, M.numpy())
    assert 0 < k2 < 3 and M2.shape == (5, 2 + k2)
    assert np.abs(M2.numpy()[:, :2] - M.numpy()).max() == 0.0  # old columns kept
    assert np.abs(projector(M2.numpy()) - projector(ref)).max() < 1e-10
    assert (M2.T @ M2 - torch.eye(2 + k2, dtype=D)).abs().max() < 1e-12
    # inputs inside span(M): nothing to add
    R3 = M.numpy() @ rng.standard_normal((2, 4))
    assert extend_basis(torch.tensor(R3 @ R3.T), M, 0.99).shape == (5, 2)
    # a per-task increment raises the threshold: 0.9 + 0.05 at task 1
    gpm = GPM(threshold=0.9, threshold_increment=0.05)
    assert gpm.threshold == 0.9


# ------------------------------------------------------------------------- plain Linear


def old_inputs(n=12, seed=1):
    """Inputs in a 2-dim subspace of R^4."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(2, 4, generator=g, dtype=D)
    return torch.randn(n, 2, generator=g, dtype=D) @ basis


def test_gpm_projection_on_a_linear_with_bias_keeps_old_outputs_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).to(D)
    x0 = old_inputs()
    y0 = torch.zeros(12, dtype=torch.long)
    gpm = GPM(threshold=1.0, n_batches=None)
    gpm.start_task(context(model, [(x0[:6], y0[:6]), (x0[6:], y0[6:])]))
    gpm.end_task(context(model, [(x0[:6], y0[:6]), (x0[6:], y0[6:])]))
    M = gpm.memory["linear:0"]
    aug = torch.cat([x0, torch.ones(12, 1, dtype=D)], 1)  # [x; 1]: rank 3
    ref, k = hand_basis(aug.T.numpy(), 1.0)
    assert k == 3 and M.shape == (5, 3) and np.abs(projector(M.numpy()) - projector(ref)).max() < 1e-10
    before = model(x0).detach()
    gpm.start_task(context(model, [], index=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(5)
    for step in range(4):
        opt.zero_grad()
        x = torch.randn(8, 4, generator=g, dtype=D)
        nn.functional.cross_entropy(model(x), torch.randint(0, 3, (8,), generator=g)).backward()
        G = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1).clone()
        gpm.project(model)
        P = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1)
        assert torch.allclose(P, G - G @ M @ M.T, rtol=0, atol=1e-14)
        assert (P @ aug.T).abs().max() < 1e-12  # orthogonal to every stored input
        opt.step()
    assert (model(x0) - before).abs().max() < 1e-12
    assert (model(torch.randn(4, 4, dtype=D, generator=g)) - 0).abs().sum() > 0
    assert gpm.state()["dims"] == {"linear:0": 3} and gpm.state()["unprotected"] == 0


def test_gpm_on_lora_projects_a_and_keeps_a_x_for_old_inputs():
    torch.manual_seed(0)
    base = nn.Linear(4, 12).to(D)
    model = nn.Sequential(QKVLoRA(base.requires_grad_(False), r=2, alpha=2.0)).to(D)
    lora = model[0]
    with torch.no_grad():
        lora.linear_b_q.weight.normal_()
        lora.linear_b_v.weight.normal_()
    x0 = old_inputs()
    gpm = GPM(threshold=1.0, layers="lora")
    model.train()
    gpm.end_task(context(model, [(x0, torch.zeros(12, dtype=torch.long))]))
    assert all(m.training for m in model.modules()) and not base._forward_hooks  # mode and hooks restored
    M = gpm.memory["lora:0"]
    assert M.shape == (4, 2)
    assert gpm.state()["unprotected"] == 2 * (4 * 2)  # B of Q and V (4 × 2 each) move freely
    gpm.start_task(context(model, [], index=1))
    a_x = [lora.linear_a_q.weight @ x0.T, lora.linear_a_v.weight @ x0.T]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3)
    x = torch.randn(6, 4, dtype=D)
    opt.zero_grad()
    model(x).square().sum().backward()
    gb = lora.linear_b_q.weight.grad.clone()
    ga = lora.linear_a_q.weight.grad.clone()
    gpm.project(model)
    assert torch.allclose(lora.linear_a_q.weight.grad, ga - ga @ M @ M.T, rtol=0, atol=1e-14)
    assert torch.equal(lora.linear_b_q.weight.grad, gb)
    opt.step()
    assert (lora.linear_a_q.weight @ x0.T - a_x[0]).abs().max() < 1e-12
    assert (lora.linear_a_v.weight @ x0.T - a_x[1]).abs().max() < 1e-12


def test_gpm_lora_b_keeps_old_outputs_of_a_lora_layer_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(QKVLoRA(nn.Linear(4, 12).requires_grad_(False), r=3, alpha=3.0)).to(D)
    lora = model[0]
    with torch.no_grad():
        lora.linear_b_q.weight.normal_()
        lora.linear_b_v.weight.normal_()
    x0 = old_inputs()  # rank 2 < r = 3: B keeps one free direction per part
    gpm = GPM(threshold=1.0, layers="all", lora_b=True)
    gpm.end_task(context(model, [(x0, None)]))
    assert set(gpm.memory) == {"lora:0"} and gpm.state()["unprotected"] == 0  # no factor read as a plain layer
    gpm.start_task(context(model, [], index=1))
    M = gpm.memory["lora:0"]
    before = model(x0).detach()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.5)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        opt.zero_grad()
        x = torch.randn(6, 4, generator=g, dtype=D)
        model(x).square().mean().backward()
        gpm.project(model)
        AM = lora.linear_a_q.weight @ M
        assert (lora.linear_b_q.weight.grad @ AM).abs().max() < 1e-13 * lora.linear_b_q.weight.grad.abs().max()
        assert lora.linear_b_q.weight.grad.abs().max() > 1e-3  # one direction of R^3 is free
        opt.step()
    assert (model(x0) - before).abs().max() < 1e-12


def test_input_covariances_conv_patches_and_bias():
    conv = nn.Conv2d(2, 3, 3, padding=1).to(D)
    x = torch.randn(2, 2, 4, 4, dtype=D)
    cov = input_covariances(conv, {"c": (conv, True)}, [(x, torch.zeros(2))])["c"]
    cols = nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)
    rows = torch.cat([cols, torch.ones(cols.shape[0], 1, dtype=D)], 1)
    assert torch.allclose(cov, rows.T @ rows, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------- OGD


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)


def logit_grads(model, pairs):
    rows = []
    for x, y in pairs:
        model.zero_grad()
        model(x)[0, y].backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad()
    return torch.stack(rows)


def test_ogd_directions_equal_gram_schmidt_and_projection_is_orthogonal():
    model = mlp()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 3, generator=g, dtype=D), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]
    ogd = OGD(per_task=5, n_batches=2)
    ctx = context(model, batches, seed=3)
    chosen = ogd._examples(ctx)
    ogd.end_task(ctx)
    G = logit_grads(model, chosen)
    Q, _ = torch.linalg.qr(G.T)
    U = torch.cat(ogd.basis, 1)
    assert ogd.k == 5 and torch.allclose(U @ U.T, torch.eye(5, dtype=D), atol=1e-12)
    assert (projector(U.T) - projector(Q)).abs().max() < 1e-10
    # task 1: orthonormal against task 0; the union spans the gradients of both
    batches2 = [(torch.randn(4, 3, generator=g, dtype=D), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]
    ctx2 = context(model, batches2, index=1, seed=4)
    chosen2 = ogd._examples(ctx2)
    ogd.start_task(ctx2)
    ogd.end_task(ctx2)
    Q2, _ = torch.linalg.qr(torch.cat([G, logit_grads(model, chosen2)]).T)
    U = torch.cat(ogd.basis, 1)
    assert ogd.k == 10 and (projector(U.T) - projector(Q2)).abs().max() < 1e-10
    # projection: g − Σ (g·u) u, orthogonal to every stored gradient
    model(batches[0][0]).sum().backward()
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    ogd.project(model)
    out = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.allclose(out, flat - U.T @ (U @ flat), rtol=0, atol=1e-13)
    assert (Q2.T @ out).abs().max() < 1e-12


def test_ogd_caps_directions_and_refuses_other_parameters():
    model = mlp()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 3, generator=g, dtype=D), torch.randint(0, 3, (8,), generator=g))]
    ogd = OGD(per_task=5, max_directions=7)
    ogd.end_task(context(model, batches))
    ogd.end_task(context(model, batches, index=1, seed=1))
    assert ogd.k == 7 and ogd.state()["dropped"] == 3 and ogd.basis[0].shape == (7, 12)
    with pytest.raises(ValueError, match="^Invalid parameters: "):
        ogd.start_task(context(model, batches, index=2, params=list(model[2].parameters())))


# ------------------------------------------------------------------------------ registry, bad input


def test_registered_and_options_validated():
    assert split_strategy("seq-lora+gpm+ogd") == ("seq-lora", ["gpm", "ogd"])
    built = make_baselines("finetune+gpm", {"gpm": {"threshold": 0.9, "layers": "linear"}}, model=mlp(), seed=0)
    assert isinstance(built[0], GPM) and built[0].threshold == 0.9 and built[0].has_projection
    for kwargs, arg in (({"threshold": 0.0}, "threshold"), ({"threshold": 1.5}, "threshold"),
                        ({"threshold_increment": -0.1}, "threshold_increment"), ({"n_batches": 0}, "n_batches"),
                        ({"layers": "conv"}, "layers"), ({"exclude": "head"}, "exclude"),
                        ({"lora_b": 1}, "lora_b")):
        with pytest.raises(ValueError, match=rf"^Invalid {arg}: "):
            GPM(**kwargs)
    for kwargs, arg in (({"per_task": 0}, "per_task"), ({"max_directions": 0}, "max_directions"),
                        ({"n_batches": 0}, "n_batches")):
        with pytest.raises(ValueError, match=rf"^Invalid {arg}: "):
            OGD(**kwargs)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_low_precision_gradients_are_projected_in_float32(dtype, tol):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).to(dtype)
    x0 = old_inputs().to(dtype)
    gpm = GPM(threshold=1.0)
    gpm.end_task(context(model, [(x0, None)]))
    gpm.start_task(context(model, [], index=1))
    assert gpm._plan[0][2].dtype == torch.float32
    model(torch.randn(5, 4, dtype=dtype)).square().sum().backward()
    scale = model[0].weight.grad.float().abs().max()
    gpm.project(model)
    P = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1).float()
    aug = torch.cat([x0.float(), torch.ones(12, 1)], 1)
    assert model[0].weight.grad.dtype == dtype and (P @ aug.T).abs().max() < tol * scale * aug.abs().max() * 5
